"""The bundles a process serves: one, or several by name (:class:`GeneratorSet`).

``SYNTHEHR_BUNDLES`` names the bundles to load: a comma-separated list of bundle folders, or
one folder whose sub-folders holding a ``manifest.json`` are bundles (loaded in name order).
Without it the service loads the single ``SYNTHEHR_BUNDLE``. Each bundle is known by its
folder's name (what the deployment chose; copies of one bundle may share a manifest name);
names must be unique. The
first bundle is the default: requests without ``model`` use it.

A :class:`GeneratorSet` behaves as its default generator (so code written for one bundle keeps
working) and adds :meth:`GeneratorSet.for_model` and :meth:`GeneratorSet.by_version`; the
generation service (:mod:`app.runtime.generation`) resolves each request's ``model`` through it,
so one API process or worker serves every loaded bundle.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from app.runtime.generators import load_generator

__all__ = ["GeneratorSet", "UnknownModelError", "bundle_paths", "load_configured",
           "load_models", "model_name"]


def model_name(generator: Any) -> str | None:
    """A single generator's model name: its bundle's folder name (the manifest's name for a
    generator that has no folder)."""
    path = getattr(generator, "path", None)
    return Path(path).resolve().name if path is not None else generator.manifest.get("name")


class UnknownModelError(ValueError):
    """A request named a model this service has not loaded."""


class GeneratorSet:
    """Named generators; attribute access falls through to the default (the first)."""

    def __init__(self, generators: dict[str, Any]) -> None:
        if not generators:
            raise ValueError("no bundle to serve")
        self.generators = dict(generators)
        self.default_name = next(iter(self.generators))

    def __getattr__(self, name: str) -> Any:
        if name in ("generators", "default_name"):  # not set yet (unpickling, copy)
            raise AttributeError(name)
        return getattr(self.generators[self.default_name], name)

    @property
    def names(self) -> list[str]:
        return list(self.generators)

    def name_of(self, model: str | None) -> str:
        """The loaded model ``model`` names (the default for None)."""
        if model is None:
            return self.default_name
        if model not in self.generators:
            raise UnknownModelError(f"unknown model {model!r}; loaded: "
                                    f"{', '.join(self.generators)}")
        return model

    def for_model(self, model: str | None) -> Any:
        return self.generators[self.name_of(model)]

    def by_version(self, bundle_version: str) -> Any | None:
        for generator in self.generators.values():
            if generator.bundle_version == bundle_version:
                return generator
        return None


def load_configured(settings) -> Any:
    """What the settings name: a :class:`GeneratorSet` for ``bundles``, else the one
    ``bundle``'s generator (the API and the worker both load through here)."""
    if settings.bundles:
        return load_models(bundle_paths(settings.bundles), settings.ort_threads)
    return load_generator(settings.bundle, settings.ort_threads)


def bundle_paths(spec: str) -> list[Path]:
    """Bundle folders from ``SYNTHEHR_BUNDLES``: a comma-separated list, or a parent folder."""
    parts = [Path(p.strip()) for p in spec.split(",") if p.strip()]
    if len(parts) == 1 and not (parts[0] / "manifest.json").is_file() and parts[0].is_dir():
        found = sorted(p for p in parts[0].iterdir() if (p / "manifest.json").is_file())
        if not found:
            raise ValueError(f"SYNTHEHR_BUNDLES={spec}: no bundle (a folder with "
                             "manifest.json) in it")
        return found
    if not parts:
        raise ValueError("SYNTHEHR_BUNDLES is empty")
    return parts


def load_models(paths: list[Path], ort_threads: int = 1) -> GeneratorSet:
    """Every bundle loaded (format and checksums verified), by folder name."""
    generators: dict[str, Any] = {}
    for path in paths:
        generator = load_generator(path, ort_threads)
        name = model_name(generator)
        if name in generators:
            raise ValueError(f"two bundles are named {name!r} ({path} and another); rename "
                             "one bundle's folder")
        generators[name] = generator
    return GeneratorSet(generators)
