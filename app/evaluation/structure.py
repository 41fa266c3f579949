"""Structure: the shape of the patients (visits per patient, codes per visit), their clinical
validity and their well-formedness (DESIGN.md, "Evaluation protocol"). Definitions, exactly:

KS statistics (:func:`ks_visits_per_patient`, :func:`ks_codes_per_visit`)
    The two-sample Kolmogorov-Smirnov statistic (:func:`scipy.stats.ks_2samp`) of visits per
    patient and of codes per visit (distinct codes), real vs synthetic.

Validity (:func:`validity`)
    Share of generated code occurrences consistent with their patient's age and sex under the
    CMS MCE v32 age and sex edits (:mod:`app.icd9.edits`).

Well-formed rate (:func:`well_formed_token_rate`, :func:`well_formed_rate`)
    For decoded token sequences: the grammar ``<s> (<v> code+ </v>)+ </s>`` holds exactly (it
    starts with BOS and ends with EOS, trailing padding aside; no empty visit; no repeated code
    within a visit; no stray special token). For patients: at least one visit, no empty visit,
    no code repeated within a visit, every code a non-empty string.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
from scipy.stats import ks_2samp

from app.corpus import Patient
from app.evaluation.counting import codes_per_visit, visits_per_patient
from app.icd9.edits import CodeEdits, load_edits

__all__ = [
    "invalid_codes",
    "ks_codes_per_visit",
    "ks_statistic",
    "ks_visits_per_patient",
    "validity",
    "well_formed_patient",
    "well_formed_rate",
    "well_formed_token_rate",
    "well_formed_tokens",
]


def ks_statistic(a: Sequence[float], b: Sequence[float]) -> float:
    """Two-sample KS statistic (scipy.stats.ks_2samp); NaN if a side is empty."""
    if len(a) == 0 or len(b) == 0:
        return float("nan")
    return float(ks_2samp(np.asarray(a, dtype=np.float64),
                          np.asarray(b, dtype=np.float64)).statistic)


def ks_visits_per_patient(real: Sequence[Patient], synthetic: Sequence[Patient]) -> float:
    return ks_statistic(visits_per_patient(real), visits_per_patient(synthetic))


def ks_codes_per_visit(real: Sequence[Patient], synthetic: Sequence[Patient]) -> float:
    return ks_statistic(codes_per_visit(real), codes_per_visit(synthetic))



def invalid_codes(patients: Iterable[Patient], edits: CodeEdits | None = None
                  ) -> list[tuple[str, str, str]]:
    """``(patient_id, code, reason)`` for every code occurrence failing the MCE age/sex edits."""
    edits = edits or load_edits()
    found = []
    for p in patients:
        for visit in p.visits:
            for code in visit:
                reason = edits.violation(code, p.age, p.sex)
                if reason is not None:
                    found.append((p.patient_id, code, reason))
    return found


def validity(patients: Sequence[Patient], edits: CodeEdits | None = None) -> float:
    """Share of code occurrences consistent with the patient's age and sex (MCE edits); NaN if
    there are no codes."""
    total = sum(len(v) for p in patients for v in p.visits)
    if total == 0:
        return float("nan")
    return 1.0 - len(invalid_codes(patients, edits)) / total


def well_formed_tokens(tokens: Sequence, vocab_tokens: Sequence[str] | None = None) -> bool:
    """Whether a decoded sequence follows ``<s> (<v> code+ </v>)+ </s>``.

    ``tokens`` are token strings, or token ids with ``vocab_tokens`` (id -> string, e.g.
    :attr:`app.vocab.Vocabulary.tokens`). Trailing ``<pad>`` after ``</s>`` is allowed;
    anything else after ``</s>``, a missing ``</s>``, an empty visit, a code repeated within a
    visit, or any other special token (``<mask>``, a nested ``<v>``) makes it ill-formed.
    """
    from app.vocab import BOS, END_VISIT, EOS, PAD, SPECIAL_TOKENS, VISIT

    seq = [vocab_tokens[t] for t in tokens] if vocab_tokens is not None else list(tokens)
    while seq and seq[-1] == PAD:
        seq.pop()
    if len(seq) < 5 or seq[0] != BOS or seq[-1] != EOS:
        return False
    specials = set(SPECIAL_TOKENS)
    visit: set | None = None  # None: between visits
    n_visits = 0
    for tok in seq[1:-1]:
        if tok == VISIT:
            if visit is not None:
                return False
            visit = set()
        elif tok == END_VISIT:
            if not visit:  # outside a visit, or an empty one
                return False
            visit = None
            n_visits += 1
        elif tok in specials or not isinstance(tok, str) or not tok:
            return False
        else:
            if visit is None or tok in visit:
                return False
            visit.add(tok)
    return visit is None and n_visits > 0


def well_formed_token_rate(sequences: Sequence[Sequence],
                           vocab_tokens: Sequence[str] | None = None) -> float:
    """Share of decoded token sequences that are well formed (NaN for none)."""
    if len(sequences) == 0:
        return float("nan")
    return sum(well_formed_tokens(s, vocab_tokens) for s in sequences) / len(sequences)


def well_formed_patient(patient: Patient) -> bool:
    """At least one visit; every visit non-empty, duplicate-free, of non-empty string codes."""
    if not patient.visits:
        return False
    for visit in patient.visits:
        if len(visit) == 0 or len(set(visit)) != len(visit):
            return False
        if not all(isinstance(c, str) and c for c in visit):
            return False
    return True


def well_formed_rate(patients: Sequence[Patient]) -> float:
    """Share of patients that are well formed (:func:`well_formed_patient`)."""
    if len(patients) == 0:
        return float("nan")
    return sum(well_formed_patient(p) for p in patients) / len(patients)
