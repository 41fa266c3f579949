"""Differentially private release of the training statistics a DP bundle ships.

A DP bundle ships two statistics of the training split besides the model, each released with
the **Gaussian mechanism on per-patient contributions clipped in L2 norm** (the same bound
DP-SGD puts on a patient's gradient) and charged to the run's RDP accountant as one
full-batch Gaussian step each (noise multiplier ``z``, sample rate 1):

1. **Vocabulary and code counts.** Over the public domain of ICD-9-CM codes (every CMS v32
   code and its 3- and 4-character prefixes, so the domain depends on no patient), each
   patient contributes 1 to every distinct code it carries, the vector clipped to L2 norm
   ``sqrt(max_codes_per_patient)``. Codes whose noisy patient count reaches ``k`` (the
   small-cell threshold) plus 4.5 noise standard deviations form the vocabulary; the rounded
   noisy counts become its counts (patients, not visits, in a DP bundle).
2. **Reference statistics.** Each patient contributes a one-hot of its number of visits (1..the
   service's visit cap) and a one-hot of its largest visit's number of codes (1..the service's
   code cap), clipped to L2 norm ``sqrt(2)`` (exact: a patient's vector has that norm). Bins
   whose noisy count is below ``k`` plus 4.5 noise deviations are dropped; patient and visit
   totals are sums of the noisy histogram.

Everything else the non-DP bundle ships from training records (co-occurrence matrix, age and
sex distributions, the retrieval index of training patients) is left out of a DP bundle.
Rounding, thresholding and derived totals are post-processing and cost no budget.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.sparse as sp

from app.corpus import Patient
from app.icd9.codes import category_of
from app.icd9.hierarchy import load_hierarchy
from app.vocab import Vocabulary

__all__ = ["STATS_RELEASES", "StatsRelease", "gaussian_clipped_sum", "public_code_domain",
           "release_statistics"]

STATS_RELEASES = 2  # Gaussian mechanisms charged to the accountant by release_statistics
# Released codes and bins need k + NOISE_MARGIN noise deviations: over ~17,500 public codes
# that nobody carries, noise alone passes with P(Z > 4.5 + k/sd) each (about 0.1 code in all
# at k = 0; 3 deviations would admit about 24 codes of pure noise)
NOISE_MARGIN = 4.5


def public_code_domain() -> list[str]:
    """Every ICD-9-CM code of the CMS v32 list and its 3-/4-character prefixes, sorted."""
    domain: set[str] = set()
    for code in load_hierarchy().billable_codes:
        cat = category_of(code)
        domain.update((code, cat))
        if len(code) > len(cat) + 1:
            domain.add(code[: len(cat) + 1])
    return sorted(domain)


def gaussian_clipped_sum(rows: sp.csr_matrix, clip: float, noise_multiplier: float,
                         rng: np.random.Generator) -> np.ndarray:
    """Column sums of ``rows`` (one row per patient) after scaling each row to L2 norm at most
    ``clip``, plus Gaussian noise of standard deviation ``noise_multiplier * clip`` per column.

    Adding or removing one patient changes the clipped sum by at most ``clip`` in L2 norm, so
    this is the Gaussian mechanism with noise multiplier ``noise_multiplier``.
    """
    rows = sp.csr_matrix(rows, dtype=np.float64)
    norms = np.sqrt(np.asarray(rows.multiply(rows).sum(axis=1)).ravel())
    scale = np.minimum(1.0, clip / np.maximum(norms, 1e-12))
    clipped = sp.diags(scale) @ rows
    total = np.asarray(clipped.sum(axis=0)).ravel()
    return total + rng.normal(0.0, noise_multiplier * clip, size=total.size)


@dataclass
class StatsRelease:
    """The released vocabulary and reference statistics, and how they were released."""

    vocab: Vocabulary
    reference_stats: dict[str, Any]
    info: dict[str, Any]


def _one_hot_rows(bins: Sequence[int], width: int, offset: int = 0) -> sp.csr_matrix:
    n = len(bins)
    cols = np.clip(np.asarray(bins, dtype=np.int64) - 1, 0, width - 1) + offset
    return sp.csr_matrix((np.ones(n), (np.arange(n), cols)), shape=(n, offset + width))


def release_statistics(patients: Sequence[Patient], *, min_patients: int,
                       max_codes_per_patient: int, noise_multiplier: float,
                       max_visits: int, max_codes_per_visit: int,
                       seed: int) -> StatsRelease:
    """Release the vocabulary and reference statistics of ``patients`` (module docstring).

    ``noise_multiplier`` applies to each of the :data:`STATS_RELEASES` Gaussian mechanisms;
    the caller charges them to its accountant.
    """
    rng = np.random.default_rng([seed, 1_000_003])
    domain = public_code_domain()
    index = {c: i for i, c in enumerate(domain)}
    indptr, cols = [0], []
    for p in patients:
        cols.extend(sorted({index[c] for v in p.visits for c in v if c in index}))
        indptr.append(len(cols))
    incidence = sp.csr_matrix((np.ones(len(cols)), np.asarray(cols, dtype=np.int64),
                               np.asarray(indptr)), shape=(len(patients), len(domain)))
    clip = float(np.sqrt(max_codes_per_patient))
    noisy = gaussian_clipped_sum(incidence, clip, noise_multiplier, rng)
    # a bare k would let noise alone admit thousands of codes no patient carries
    threshold = max(min_patients, 1) + NOISE_MARGIN * noise_multiplier * clip
    keep = np.flatnonzero(noisy >= threshold)
    codes = [domain[i] for i in keep]
    counts = np.maximum(np.rint(noisy[keep]), 1).astype(np.int64)
    categories = sorted({category_of(c) for c in codes})
    vocab = Vocabulary(codes, counts, categories)
    vocab.min_patients = int(min_patients)

    visits = [len(p.visits) for p in patients]
    largest = [max((len(v) for v in p.visits), default=1) for p in patients]
    shape = (len(patients), max_visits + max_codes_per_visit)
    both = sp.hstack([_one_hot_rows(visits, max_visits),
                      _one_hot_rows(largest, max_codes_per_visit)]).tocsr() if patients \
        else sp.csr_matrix(shape)
    hist = gaussian_clipped_sum(both, float(np.sqrt(2.0)), noise_multiplier, rng)
    bin_threshold = max(min_patients, 1) + NOISE_MARGIN * noise_multiplier * np.sqrt(2.0)
    vpp, cpv = hist[:max_visits], hist[max_visits:]
    n_patients = max(round(float(vpp.sum())), 1)
    n_visits = max(round(float(np.maximum(vpp, 0) @ np.arange(1, max_visits + 1))), 1)

    def _kept(h: np.ndarray) -> dict[str, int]:
        out = {str(i + 1): round(float(x)) for i, x in enumerate(h) if x >= bin_threshold}
        return out or {"1": 1}

    category_counts: dict[str, int] = {}
    for code, n in zip(codes, counts.tolist(), strict=True):
        cat = category_of(code)
        category_counts[cat] = category_counts.get(cat, 0) + n
    stats = {
        "n_patients": n_patients,
        "n_visits": n_visits,
        "n_code_occurrences": int(counts.sum()),
        "codes": codes,
        "code_visit_counts": counts.tolist(),
        "category_visit_counts": dict(sorted(category_counts.items())),
        "codes_per_visit": _kept(cpv),
        "visits_per_patient": _kept(vpp),
        "differentially_private": True,
        "notes": ("DP release: code counts are noisy patient counts; codes_per_visit counts "
                  "patients by their largest visit; age and sex distributions are left out"),
    }
    info = {
        "mechanism": "Gaussian, per-patient contributions clipped in L2 norm",
        "noise_multiplier": noise_multiplier,
        "releases": {
            "vocabulary": {"domain": f"{len(domain)} public ICD-9-CM codes (CMS v32 + prefixes)",
                           "l2_clip": clip, "max_codes_per_patient": max_codes_per_patient,
                           "noise_std": noise_multiplier * clip,
                           "threshold": f"noisy patient count >= k + {NOISE_MARGIN:g} noise "
                                        f"sd = {threshold:.1f}"},
            "reference_stats": {"histograms": [f"visits per patient (1..{max_visits})",
                                               f"largest visit's codes (1..{max_codes_per_visit})"],
                                "l2_clip": float(np.sqrt(2.0)),
                                "noise_std": noise_multiplier * float(np.sqrt(2.0)),
                                "threshold": f"bins below {bin_threshold:.1f} dropped"},
        },
        "omitted": {"cooccurrence.npz": "pair counts of training visits (not released)",
                    "train_index.json.gz": "training patients (retrieve_edit is off)",
                    "age and sex distributions": "not needed at run time"},
    }
    return StatsRelease(vocab, stats, info)
