"""Protocol metrics that train something: detection, train-on-synthetic utility (TSTR) and
attribute inference (DESIGN.md, "Evaluation protocol"). They need scikit-learn (the ``train``
extra), imported when a metric runs, so serving never needs it. Definitions, exactly:

Features (:func:`patient_features`)
    One row per patient: multi-hot of the codes in any of its visits (minus any excluded
    codes), age / 90 and 1 for ``F`` (0 for ``M``). Visit order and counts are not features.

Detection AUC (:func:`detection_auc`)
    A classifier two-sample test. Real test patients (label 0) and cohort patients (label 1),
    the larger side subsampled (seeded) to the smaller so classes balance; L2 logistic
    regression (liblinear, C = 1, ``class_weight="balanced"``) on :func:`patient_features`;
    out-of-fold probabilities from stratified 5-fold cross-validation (shuffled, seeded); the
    ROC AUC of those probabilities. 0.5: the classifier cannot tell the cohorts apart; 1.0: it
    always can.

Utility, TSTR (:func:`choose_utility_task`, :func:`tstr_auroc`)
    Task: *does the patient carry any code of category G* (3-character ICD-9-CM category, any
    visit), from age, sex and every code outside G. G is chosen on the training split, per
    dataset, as the category whose share of training patients is closest to 25% (ties by
    category); the report records it. The same logistic regression as detection is trained on
    a cohort and scored (ROC AUC) on the real test split. The floor row trains on real
    training patients, so ``tstr_auroc_real`` (train on an equal-sized real training sample,
    also reported on every row) is the reference. A cohort with only one class predicts a
    constant: AUROC 0.5.

Attribute inference (:func:`attribute_inference_f1`)
    The attacker knows a training patient's age band (:data:`app.evaluation.breakdown.
    STRATUM_AGE_BANDS`), sex and codes outside a sensitive group (default: ICD-9-CM chapter
    290-319, mental disorders), and predicts whether the patient carries a code of that group:
    the answer is the sensitive label of the released patient nearest by Jaccard similarity
    over those known attributes (ties: the first in cohort order). Targets: a seeded sample of
    training patients. Reported: the F1 of the positive class with the cohort released,
    against the same attack with a real holdout (the test split) in its place. A cohort that
    leaks no more than the holdout scores about the holdout's F1.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence

import numpy as np
import scipy.sparse as sp

from app.corpus import AGE_CAP, Patient
from app.evaluation.breakdown import stratum_of
from app.evaluation.counting import CodeIndex
from app.icd9.codes import InvalidCodeError, category_of
from app.icd9.hierarchy import chapter_of
from app.similarity import CodeSetIndex

__all__ = [
    "DEFAULT_SENSITIVE_CHAPTER",
    "attribute_inference_f1",
    "choose_utility_task",
    "detection_auc",
    "has_category",
    "in_chapter",
    "patient_features",
    "tstr_auroc",
]

DEFAULT_SENSITIVE_CHAPTER = "290-319"


def patient_features(patients: Sequence[Patient], index: CodeIndex,
                     exclude: Callable[[str], bool] | None = None) -> sp.csr_matrix:
    """Patients x (codes of ``index`` + 2) CSR float64: multi-hot codes (codes for which
    ``exclude`` is true left out; new codes are added to ``index``), then age / 90, then
    female. Callers widen to a shared width with :func:`_width`."""
    rows, cols = [], []
    for i, p in enumerate(patients):
        codes = {c for v in p.visits for c in v}
        for c in codes:
            if exclude is None or not exclude(c):
                rows.append(i)
                cols.append(index.add(c))
    n_codes = len(index)
    data = np.ones(len(rows), dtype=np.float64)
    codes_part = sp.csr_matrix((data, (rows, cols)), shape=(len(patients), n_codes))
    demo = np.array([[min(p.age, AGE_CAP) / AGE_CAP, 1.0 if p.sex == "F" else 0.0]
                     for p in patients], dtype=np.float64).reshape(len(patients), 2)
    return sp.hstack([codes_part, sp.csr_matrix(demo)], format="csr")


def _width(matrix: sp.csr_matrix, n_codes: int) -> sp.csr_matrix:
    """Re-lay ``patient_features`` output built when the index had fewer codes: code columns
    padded to ``n_codes``, demographics kept as the last two columns."""
    old = matrix.shape[1] - 2
    if old == n_codes:
        return matrix
    codes_part = matrix[:, :old]
    pad = sp.csr_matrix((matrix.shape[0], n_codes - old))
    return sp.hstack([codes_part, pad, matrix[:, old:]], format="csr")


def _classifier(seed: int):
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(C=1.0, solver="liblinear", class_weight="balanced",
                              max_iter=1000, random_state=seed)


def detection_auc(real: Sequence[Patient], synthetic: Sequence[Patient], seed: int = 0,
                  folds: int = 5) -> float:
    """Out-of-fold ROC AUC of a logistic regression telling cohort from real patients (module
    docstring); NaN when a side has fewer than ``folds`` patients."""
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedKFold, cross_val_predict

    n = min(len(real), len(synthetic))
    if n < folds:
        return float("nan")
    rng = np.random.default_rng(seed)
    real = [real[i] for i in np.sort(rng.choice(len(real), n, replace=False))]
    synthetic = [synthetic[i] for i in np.sort(rng.choice(len(synthetic), n, replace=False))]
    index = CodeIndex()
    xr = patient_features(real, index)
    xs = patient_features(synthetic, index)
    x = sp.vstack([_width(xr, len(index)), _width(xs, len(index))], format="csr")
    y = np.r_[np.zeros(n), np.ones(n)]
    cv = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    scores = cross_val_predict(_classifier(seed), x, y, cv=cv, method="predict_proba")[:, 1]
    return float(roc_auc_score(y, scores))


def _category(code: str) -> str | None:
    try:
        return category_of(code)
    except InvalidCodeError:
        return None


def choose_utility_task(train: Sequence[Patient], target_share: float = 0.25
                        ) -> tuple[str, float]:
    """``(category, share of training patients carrying it)`` for the category whose share is
    closest to ``target_share`` (ties by category)."""
    carriers: Counter = Counter()
    for p in train:
        carriers.update({c for v in p.visits for code in v if (c := _category(code))})
    if not carriers or not train:
        raise ValueError("the training split has no codes")
    n = len(train)
    best = min(carriers, key=lambda c: (abs(carriers[c] / n - target_share), c))
    return best, carriers[best] / n


def has_category(patient: Patient, category: str) -> bool:
    return any(_category(c) == category for v in patient.visits for c in v)


def tstr_auroc(train_cohort: Sequence[Patient], test: Sequence[Patient], category: str,
               seed: int = 0) -> float:
    """ROC AUC on ``test`` of a logistic regression trained on ``train_cohort`` to predict
    carrying ``category`` from age, sex and the other codes (module docstring)."""
    from sklearn.metrics import roc_auc_score

    y_test = np.array([has_category(p, category) for p in test], dtype=np.int64)
    if y_test.min(initial=0) == y_test.max(initial=0):
        return float("nan")  # the test split cannot score the task
    y_train = np.array([has_category(p, category) for p in train_cohort], dtype=np.int64)
    if len(train_cohort) == 0 or y_train.min() == y_train.max():
        return 0.5

    def in_group(code: str) -> bool:  # the label's own codes are not features
        return _category(code) == category

    index = CodeIndex()
    x_train = patient_features(train_cohort, index, exclude=in_group)
    x_test = patient_features(test, index, exclude=in_group)
    n = len(index)
    model = _classifier(seed).fit(_width(x_train, n), y_train)
    return float(roc_auc_score(y_test, model.predict_proba(_width(x_test, n))[:, 1]))


def in_chapter(chapter_key: str) -> Callable[[str], bool]:
    """Predicate: the code lies in the ICD-9-CM chapter ``chapter_key`` (e.g. ``290-319``)."""
    def test(code: str) -> bool:
        try:
            return chapter_of(code).key == chapter_key
        except InvalidCodeError:
            return False
    return test


def _known_sets(patients: Sequence[Patient], index: CodeIndex,
                sensitive: Callable[[str], bool]) -> tuple[sp.csr_matrix, np.ndarray]:
    """Binary patients x attributes (codes outside the sensitive group, plus an age-band and a
    sex pseudo-attribute) and the sensitive label of each patient."""
    rows, cols, labels = [], [], []
    for i, p in enumerate(patients):
        codes = {c for v in p.visits for c in v}
        labels.append(any(sensitive(c) for c in codes))
        band = stratum_of(p)
        attrs = {c for c in codes if not sensitive(c)}
        attrs |= {f"sex:{p.sex}", f"age-band:{band[0] if band else '?'}"}
        for a in attrs:
            rows.append(i)
            cols.append(index.add(a))
    matrix = sp.csr_matrix((np.ones(len(rows), dtype=np.float32), (rows, cols)),
                           shape=(len(patients), len(index)))
    return matrix, np.asarray(labels, dtype=bool)


def attribute_inference_f1(released: Sequence[Patient], targets: Sequence[Patient],
                           sensitive: Callable[[str], bool] | None = None) -> float:
    """F1 (positive class) of the nearest-neighbour attribute-inference attack on ``targets``
    with ``released`` as the attacker's data (module docstring); NaN with no released patient
    or no target."""
    from sklearn.metrics import f1_score

    if not released or not targets:
        return float("nan")
    sensitive = sensitive or in_chapter(DEFAULT_SENSITIVE_CHAPTER)
    index = CodeIndex()
    base, base_labels = _known_sets(released, index, sensitive)
    query, truth = _known_sets(targets, index, sensitive)
    n = len(index)
    base = sp.csr_matrix((base.data, base.indices, base.indptr), shape=(base.shape[0], n))
    guess = base_labels[CodeSetIndex(base).nearest(query)[1]]
    return float(f1_score(truth, guess, zero_division=0.0))
