"""The evaluation protocol driver (DESIGN.md, "Evaluation protocol").

One run: generate as many patients as the test split has, conditioned one-to-one on the test
patients' (age, sex), once per decoding strategy; add the two references drawn in the same run
(``floor``: an equal-sized sample of real training patients; ``baseline``: the
independent-marginals sampler); score every cohort with :func:`app.evaluation.evaluate_cohort`
against one shared :class:`app.evaluation.Reference`, plus the newer metrics
(:func:`app.evaluation.extended_metrics`: sequential, long tail, strata, detection, TSTR,
attribute inference) and, when asked, the Anonymeter audit
(:mod:`training.anonymeter_audit`); judge them with a target profile of
:data:`app.evaluation.TARGET_PROFILES`; write and print the report.

The generation engine is plugged in as a callable, so this module does not depend on it::

    def generate(strategy: str, demographics: list[tuple[float, str]], seed: int, *,
                 validity_mask: bool = True) -> list[Patient]: ...

It must return one patient per (age, sex), in order. The driver calls it in chunks (so it can
show progress), each chunk with its own seed derived from the run's seed; ``validity_mask=False``
asks for the model alone (no MCE mask in decoding), which is only scored for validity.

The CLI (``synthehr evaluate``) builds that callable with :func:`service_generate_fn`, over the
runtime's generation service (the door the API and the cohort worker generate through), and
calls :func:`run_protocol`.
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from app.corpus import Patient
from app.evaluation.cohort import Reference, evaluate_cohort
from app.evaluation.extended import ExtendedReference, add_gap_shares, extended_metrics
from app.evaluation.protocol import (
    TARGET_PROFILES,
    independent_marginals_sampler,
    real_floor_sample,
)
from training.report import write_report
from training.report.tables import BASELINE, FLOOR, print_table

if TYPE_CHECKING:
    from app.runtime.generation import GenerationService

__all__ = [
    "BASELINE",
    "FLOOR",
    "MODEL_ALONE_SUFFIX",
    "SOURCE_CITATIONS",
    "GenerateFn",
    "ProtocolResult",
    "derive_seed",
    "evaluate_cohorts",
    "load_split",
    "protocol_cohorts",
    "protocol_demographics",
    "run_protocol",
    "service_generate_fn",
]

MODEL_ALONE_SUFFIX = " (model alone)"

# How a report names each real source (their licences ask derived tables to name them).
SOURCE_CITATIONS = {
    "uci": "Diabetes 130-US hospitals for years 1999-2008 (Strack et al., 2014, BioMed Research "
           "International; UCI Machine Learning Repository), CC BY 4.0",
    "mimic3": "MIMIC-III Clinical Database (Johnson et al., 2016, PhysioNet)",
    "mimic4": "MIMIC-IV (Johnson et al., 2023, PhysioNet)",
    "eicu": "eICU Collaborative Research Database (Pollard et al., 2018, PhysioNet)",
}


class GenerateFn(Protocol):
    def __call__(self, strategy: str, demographics: list[tuple[float, str]], seed: int, *,
                 validity_mask: bool = True) -> list[Patient]: ...


def service_generate_fn(service: GenerationService,
                        params: Mapping[str, Mapping[str, Any]] | None = None) -> GenerateFn:
    """The protocol's callable over the generation service: each call (one chunk) is one typed
    request - the strategy with its ``params``, the chunk's seed, the mask - checked once by
    the service and decoded in this thread. A refused request raises
    :class:`~app.decoding.errors.InvalidParametersError`."""
    from pydantic import ValidationError

    from app.decoding.errors import InvalidParametersError
    from app.runtime.requests import GenerationRequest

    given = {name: dict(values) for name, values in (params or {}).items()}

    def generate(strategy: str, demographics: list[tuple[float, str]], seed: int, *,
                 validity_mask: bool = True) -> list[Patient]:
        try:
            request = GenerationRequest.model_validate({
                "strategy": strategy, "params": given.get(strategy, {}), "seed": seed,
                "validity_mask": validity_mask})
        except ValidationError as err:
            first = err.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "request"
            raise InvalidParametersError(f"{strategy}: {where}: {first['msg']}") from None
        return service.generate(service.prepare(request), demographics)

    return generate


def derive_seed(seed: int, *keys: str | int) -> int:
    """A 32-bit seed for one purpose (``"floor"``, a strategy, a chunk) derived from the run's
    seed, stable across processes and Python versions."""
    words = [int(seed) & 0xFFFFFFFF]
    for key in keys:
        words.append(zlib.crc32(key.encode()) if isinstance(key, str) else int(key) & 0xFFFFFFFF)
    return int(np.random.SeedSequence(words).generate_state(1)[0])


def protocol_demographics(test: Sequence[Patient]) -> list[tuple[float, str]]:
    """The conditioning of the protocol: each test patient's (age, sex), in split order."""
    return [(float(p.age), p.sex) for p in test]


def _progress(enabled: bool, console):
    if not enabled:
        return None
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), TimeRemainingColumn(), console=console, transient=False)


def _generate(generate_fn: GenerateFn, strategy: str, demographics: list[tuple[float, str]],
              seed: int, mask: bool, chunk_size: int, bar, task) -> list[Patient]:
    patients: list[Patient] = []
    for number, start in enumerate(range(0, len(demographics), chunk_size)):
        chunk = demographics[start:start + chunk_size]
        out = list(generate_fn(strategy, chunk, seed=derive_seed(seed, strategy, number),
                               validity_mask=mask))
        if len(out) != len(chunk):
            raise ValueError(f"strategy {strategy!r}: asked for {len(chunk)} patients, "
                             f"got {len(out)}")
        patients.extend(out)
        if bar is not None:
            bar.advance(task, len(chunk))
    return patients


def protocol_cohorts(test: Sequence[Patient], train: Sequence[Patient],
                     generate_fn: GenerateFn | None = None, strategies: Sequence[str] = (),
                     seed: int = 0, *, model_alone: Sequence[str] = ("plain",),
                     chunk_size: int = 256, progress: bool = True, console=None,
                     timings: dict[str, float] | None = None) -> dict[str, list[Patient]]:
    """The protocol's cohorts: one per strategy (conditioned one-to-one on the test patients'
    demographics), ``<strategy> (model alone)`` for each strategy in ``model_alone`` (decoded
    without the validity mask), then ``floor`` and ``baseline``, always. With no
    ``generate_fn`` only the two references are made. Generation seconds per cohort go into
    ``timings`` when given.
    """
    strategies = list(strategies)
    if strategies and generate_fn is None:
        raise ValueError("strategies given without a generate_fn")
    demographics = protocol_demographics(test)
    n = len(demographics)
    jobs: list[tuple[str, str, bool]] = []
    for strategy in strategies:
        jobs.append((strategy, strategy, True))
    for strategy in strategies:
        if strategy in model_alone:
            jobs.append((strategy + MODEL_ALONE_SUFFIX, strategy, False))
    cohorts: dict[str, list[Patient]] = {}
    timings = timings if timings is not None else {}
    bar = _progress(progress and bool(jobs), console)
    if bar is not None:
        bar.start()
    try:
        for name, strategy, mask in jobs:
            task = bar.add_task(f"generating {name}", total=n) if bar is not None else None
            start = time.perf_counter()
            cohorts[name] = _generate(generate_fn, strategy, demographics, seed, mask,
                                      chunk_size, bar, task)
            timings[name] = time.perf_counter() - start
    finally:
        if bar is not None:
            bar.stop()
    start = time.perf_counter()
    cohorts[FLOOR] = real_floor_sample(train, n, seed=derive_seed(seed, FLOOR))
    timings[FLOOR] = time.perf_counter() - start
    start = time.perf_counter()
    cohorts[BASELINE] = independent_marginals_sampler(train, n, demographics,
                                                      seed=derive_seed(seed, BASELINE))
    timings[BASELINE] = time.perf_counter() - start
    return cohorts


def evaluate_cohorts(cohorts: Mapping[str, Sequence[Patient]], test: Sequence[Patient],
                     train: Sequence[Patient], *, seed: int = 0, mia_size: int | None = None,
                     timings: Mapping[str, float] | None = None, progress: bool = False,
                     console=None, extended: bool = True, learned: bool = True,
                     anonymeter: bool = False, anonymeter_python: str | Path | None = None,
                     anonymeter_attacks: int = 2000, details: dict | None = None
                     ) -> dict[str, dict[str, float]]:
    """Score every cohort against one :class:`app.evaluation.Reference`. A ``<s> (model alone)``
    cohort is folded into row ``s`` as ``validity_model_alone``; the floor and baseline, which
    have no mask, report their validity there too.

    ``extended`` adds the newer metrics (:func:`app.evaluation.extended_metrics`;
    ``learned=False`` leaves out the scikit-learn ones) and each R2's share of the
    baseline-to-floor gap; ``anonymeter`` adds the Anonymeter risks
    (:func:`training.anonymeter_audit.run_audit`). What is not a number per row (strata, the
    utility task, the audit's status) goes into ``details`` when given."""
    reference = Reference.build(test, train, seed=seed, mia_size=mia_size)
    details = details if details is not None else {}
    extra_ref = None
    if extended:
        if progress and console is not None:
            console.log("building the references of the extended metrics")
        extra_ref = ExtendedReference.build(test, train, seed=seed, learned=learned)
        details["utility_task"] = {
            "category": extra_ref.utility_category, "train_share": extra_ref.utility_share,
            "definition": "carries any code of this 3-character category (any visit), "
                          "from age, sex and the other codes"}
        details["tail_codes"] = len(extra_ref.tail)
        details["strata"] = {}
        details["stratum_worst"] = {}
    rows: dict[str, dict[str, float]] = {}
    alone: dict[str, float] = {}
    for name, patients in cohorts.items():
        if progress and console is not None:
            console.log(f"scoring {name}")
        if name.endswith(MODEL_ALONE_SUFFIX):
            row = evaluate_cohort(patients, reference=reference)
            alone[name[:-len(MODEL_ALONE_SUFFIX)]] = row["validity"]
            continue
        rows[name] = evaluate_cohort(patients, reference=reference)
        if extra_ref is not None:
            numbers, detail = extended_metrics(patients, extra_ref)
            rows[name].update(numbers)
            details["strata"][name] = detail["strata"]
            details["stratum_worst"][name] = detail["stratum_worst"]
        if timings and name in timings:
            rows[name]["generation_seconds"] = float(timings[name])
    for name, row in rows.items():
        if name in alone:
            row["validity_model_alone"] = alone[name]
        elif name in (FLOOR, BASELINE):
            row["validity_model_alone"] = row["validity"]
    if extended:
        add_gap_shares(rows, FLOOR, BASELINE)
    if anonymeter:
        from training.anonymeter_audit import run_audit

        if progress and console is not None:
            console.log("Anonymeter audit")
        main = {n: c for n, c in cohorts.items() if not n.endswith(MODEL_ALONE_SUFFIX)}
        risks, status = run_audit(main, train, test, n_attacks=anonymeter_attacks, seed=seed,
                                  python=anonymeter_python)
        for name, values in risks.items():
            rows[name].update(values)
        details["anonymeter"] = {"status": status, "n_attacks": anonymeter_attacks}
    return rows


@dataclass
class ProtocolResult:
    rows: dict[str, dict[str, float]]
    cohorts: dict[str, list[Patient]]
    details: dict = field(default_factory=dict)
    paths: dict[str, Path] = field(default_factory=dict)
    seconds: float = 0.0


def run_protocol(test: Sequence[Patient], train: Sequence[Patient], *,
                 generate_fn: GenerateFn | None = None, strategies: Sequence[str] = (),
                 out_dir: str | Path | None = None, meta: Mapping | None = None, seed: int = 0,
                 model_alone: Sequence[str] = ("plain",), mia_size: int | None = None,
                 chunk_size: int = 256, console=None, progress: bool = True,
                 show_table: bool = True, targets: str = "relative", extended: bool = True,
                 learned: bool = True, anonymeter: bool = False,
                 anonymeter_python: str | Path | None = None,
                 anonymeter_attacks: int = 2000) -> ProtocolResult:
    """The whole protocol: cohorts (:func:`protocol_cohorts`), rows
    (:func:`evaluate_cohorts`), the terminal table and, with ``out_dir``, ``report.json``,
    ``report.html`` and ``report.md``. ``meta`` names the source (``source``; a
    ``source_citation`` is filled in for known sources) and whatever the caller wants
    recorded (bundle, split sizes, ...). ``targets`` names a profile of
    :data:`app.evaluation.TARGET_PROFILES` (``relative``: judged against the run's floor and
    baseline; ``uci``: UCI's absolute numbers). The other flags go to
    :func:`evaluate_cohorts`."""
    from rich.console import Console

    if targets not in TARGET_PROFILES:
        raise ValueError(f"unknown target profile {targets!r}; choose from "
                         + ", ".join(TARGET_PROFILES))
    profile = TARGET_PROFILES[targets]
    console = console or Console()
    started = time.perf_counter()
    timings: dict[str, float] = {}
    cohorts = protocol_cohorts(test, train, generate_fn, strategies, seed,
                               model_alone=model_alone, chunk_size=chunk_size,
                               progress=progress, console=console, timings=timings)
    details: dict = {}
    rows = evaluate_cohorts(cohorts, test, train, seed=seed, mia_size=mia_size,
                            timings=timings, progress=progress, console=console,
                            extended=extended, learned=learned, anonymeter=anonymeter,
                            anonymeter_python=anonymeter_python,
                            anonymeter_attacks=anonymeter_attacks, details=details)
    meta = dict(meta or {})
    source = meta.get("source")
    if source in SOURCE_CITATIONS:
        meta.setdefault("source_citation", SOURCE_CITATIONS[source])
    meta.setdefault("strategies", ", ".join(strategies) if strategies else "(none)")
    meta.setdefault("seed", seed)
    meta.setdefault("targets", targets)
    meta.setdefault("split_sizes", {"train": len(train), "test": len(test)})
    if show_table:
        title = f"evaluation on {source or 'test split'} ({len(test):,} test patients)"
        print_table(rows, console=console, title=title, targets=profile)
    result = ProtocolResult(rows=rows, cohorts=cohorts, details=details)
    if out_dir is not None:
        main = {n: c for n, c in cohorts.items() if not n.endswith(MODEL_ALONE_SUFFIX)}
        meta["seconds"] = round(time.perf_counter() - started, 1)
        result.paths = write_report(out_dir, rows, main, test, train, meta, targets=profile,
                                    details=details)
        if show_table:
            console.print(f"report: {result.paths['html']}")
    result.seconds = time.perf_counter() - started
    return result


def load_split(source: str, path: str | Path):
    """Load a source with its loader and split it (:func:`training.splits.split_patients`)."""
    from training.loaders import load_corpus
    from training.splits import split_patients

    return split_patients(load_corpus(source, path).patients)
