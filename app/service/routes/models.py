"""``GET /v1/models``: the loaded bundles' manifests and evaluation summaries."""

from __future__ import annotations

from typing import Any

from app.runtime.bundles import GeneratorSet, model_name
from app.service.dependencies import State
from app.service.routes import versioned
from app.service.schemas import ModelInfo

__all__ = ["router"]

router = versioned()


@router.get("/models", response_model=ModelInfo, tags=["model"],
            summary="The loaded bundles' manifests and evaluation summaries (default first)")
def get_models(state: State) -> Any:
    gen = state.ready().generator
    named = (gen.generators if isinstance(gen, GeneratorSet)
             else {model_name(gen): gen})
    infos = [ModelInfo(name=name, default=i == 0, bundle_version=g.bundle_version,
                       strategies=list(g.strategies), manifest=g.manifest,
                       evaluation=g.evaluation, privacy=g.manifest.get("privacy"),
                       unavailable_strategies=dict(getattr(g, "unavailable", {}) or {}),
                       default_temperature=_temperature(g))
             for i, (name, g) in enumerate(named.items())]
    return infos[0].model_copy(update={"models": infos})


def _temperature(generator: Any) -> float:
    """The engine's fitted default temperature (1.0 without a calibration)."""
    calibration = getattr(getattr(generator, "engine", None), "calibration", None)
    return float(calibration.temperature) if calibration is not None else 1.0
