"""The evaluation protocol (DESIGN.md, "Evaluation protocol"), numpy/scipy only (the learned
metrics import scikit-learn when they run).

Everything here takes lists of :class:`app.corpus.Patient` (or decoded token lists) and returns
plain numbers, so the same code scores a model's cohort, the real floor and the baseline, in
tests, benchmarks and the README table. Each module's docstring holds its exact definitions:

* :mod:`~app.evaluation.counting`: code columns, incidence matrices, per-visit tallies;
* :mod:`~app.evaluation.fidelity`: JSD, top-100 overlap, unigram and bigram R2, co-occurrence;
* :mod:`~app.evaluation.structure`: visits and codes per visit (KS), validity, well-formedness;
* :mod:`~app.evaluation.privacy`: exact copies, distance to closest record, membership inference;
* :mod:`~app.evaluation.cohort`: one cohort's row against references built once per run;
* :mod:`~app.evaluation.protocol`: the floor and baseline rows, targets and verdicts;
* :mod:`~app.evaluation.breakdown`: sequential R2, the long tail, demographic strata;
* :mod:`~app.evaluation.learned`: detection, train-on-synthetic utility, attribute inference;
* :mod:`~app.evaluation.extended`: the breakdown and learned metrics of one cohort.

The modules' public names are importable from the package too, except the counting and
matching helpers the modules share among themselves.
"""

from app.evaluation.breakdown import (
    STRATUM_AGE_BANDS,
    conditional_probabilities,
    long_tail_metrics,
    sequential_r2,
    stratum_label,
    stratum_metrics,
    stratum_of,
    tail_codes,
    transition_counts,
)
from app.evaluation.cohort import (
    Reference,
    evaluate_cohort,
)
from app.evaluation.counting import (
    CodeIndex,
    code_counts,
    pair_counts,
    patient_matrix,
    visit_matrix,
)
from app.evaluation.extended import (
    GAP_METRICS,
    ExtendedReference,
    add_gap_shares,
    extended_metrics,
)
from app.evaluation.fidelity import (
    aligned_prevalence,
    bigram_r2,
    code_jsd,
    cooccurrence_score,
    jsd_from_counts,
    r2_score,
    sparse_r2,
    top_k_codes,
    top_k_overlap,
    unigram_r2,
)
from app.evaluation.learned import (
    DEFAULT_SENSITIVE_CHAPTER,
    attribute_inference_f1,
    choose_utility_task,
    detection_auc,
    has_category,
    in_chapter,
    patient_features,
    tstr_auroc,
)
from app.evaluation.privacy import (
    dcr_summary,
    distance_to_closest_record,
    exact_copy_rate,
    membership_inference_auc,
    nearest_jaccard_distance,
    rank_auc,
    record_key,
)
from app.evaluation.protocol import (
    GAP_SHARE,
    PROTOCOL_TARGETS,
    RELATIVE_TARGETS,
    TARGET_PROFILES,
    UCI_TARGETS,
    Target,
    check_targets,
    gap_closed,
    independent_marginals_sampler,
    real_floor_sample,
)
from app.evaluation.structure import (
    invalid_codes,
    ks_codes_per_visit,
    ks_statistic,
    ks_visits_per_patient,
    validity,
    well_formed_patient,
    well_formed_rate,
    well_formed_token_rate,
    well_formed_tokens,
)

__all__ = [
    "DEFAULT_SENSITIVE_CHAPTER",
    "GAP_METRICS",
    "GAP_SHARE",
    "PROTOCOL_TARGETS",
    "RELATIVE_TARGETS",
    "STRATUM_AGE_BANDS",
    "TARGET_PROFILES",
    "UCI_TARGETS",
    "CodeIndex",
    "ExtendedReference",
    "Reference",
    "Target",
    "add_gap_shares",
    "aligned_prevalence",
    "attribute_inference_f1",
    "bigram_r2",
    "check_targets",
    "choose_utility_task",
    "code_counts",
    "code_jsd",
    "conditional_probabilities",
    "cooccurrence_score",
    "dcr_summary",
    "detection_auc",
    "distance_to_closest_record",
    "evaluate_cohort",
    "exact_copy_rate",
    "extended_metrics",
    "gap_closed",
    "has_category",
    "in_chapter",
    "independent_marginals_sampler",
    "invalid_codes",
    "jsd_from_counts",
    "ks_codes_per_visit",
    "ks_statistic",
    "ks_visits_per_patient",
    "long_tail_metrics",
    "membership_inference_auc",
    "nearest_jaccard_distance",
    "pair_counts",
    "patient_features",
    "patient_matrix",
    "r2_score",
    "rank_auc",
    "real_floor_sample",
    "record_key",
    "sequential_r2",
    "sparse_r2",
    "stratum_label",
    "stratum_metrics",
    "stratum_of",
    "tail_codes",
    "top_k_codes",
    "top_k_overlap",
    "transition_counts",
    "tstr_auroc",
    "unigram_r2",
    "validity",
    "visit_matrix",
    "well_formed_patient",
    "well_formed_rate",
    "well_formed_token_rate",
    "well_formed_tokens",
]
