"""Simulated corpora: a seeded generative process over real ICD-9-CM codes with a known truth.

The simulated corpus is the embedded default for a first run, the ground truth for tests (the
comorbidity clusters are exported, so a test can check that a model recovers them) and the
MIMIC-III-sized scale benchmark. It uses only the CMS v32 billable codes and the MCE v32 edits
shipped in :mod:`app.icd9`, and ``numpy.random.Generator(seed)``: one seed, one corpus.

Generative process (per :class:`SimulationConfig`; every draw from one ``Generator(seed)``):

1. **Code universe.** The 14,567 billable CMS v32 codes. Patients fall in demographic groups:
   sex x an age band (``0``, ``1-11``, ``12-14``, ``15-17``, ``18-44``, ``45-55``, ``56-64``,
   ``65-79``, ``80-90``). The bands refine every MCE age breakpoint, so a per-group mask of
   allowed codes is exact: a code is allowed when it passes the MCE age and sex edits and, for
   chapter 760-779 (perinatal conditions), only at age 0 (MCE leaves some of those unedited).
2. **Clusters.** ``n_clusters`` disjoint comorbidity clusters. The first come from a curated
   list of clinical clusters (e.g. hypertension/diabetes/lipids, heart failure/atrial
   fibrillation, newborn care, pregnancy and delivery), each a few related 3-character
   categories plus lead codes, with an age range and sex it favours. More clusters than the
   list holds are generated from runs of 2-4 adjacent unclaimed categories of one chapter
   (ICD-9 puts related conditions next to each other). A cluster's codes are its lead codes,
   then its categories' codes in seeded random order, at most ``cluster_max_codes``; within a
   cluster code ``i`` (0-based) has probability proportional to ``(i + 1) ** -cluster_zipf``.
3. **Patients.** Sex is male with probability ``male_share``. Age is 0 (a newborn) with
   probability ``newborn_share``, uniform on 1-17 with probability ``child_share``, else a
   normal ``(adult_age_mean, adult_age_sd)`` rounded to whole years and clipped to 18-90 (the
   clip gives a mass at 90 like MIMIC's 89+ patients).
4. **Cluster choice.** Each patient has 1, 2 or 3 clusters (probabilities
   ``clusters_per_patient``), drawn without replacement with weight
   ``(k + 1) ** -cluster_prevalence_zipf`` x age factor (1 inside the cluster's age range,
   ``age_leak`` outside, but 0 across the newborn line: neonates get only clusters whose range
   includes 0, and newborn-only clusters nobody older) x sex factor (1, or
   ``other_sex_factor`` for the sex the cluster does not favour) x the share of the cluster's
   probability mass the patient's group may use. A patient with fewer eligible clusters gets
   fewer.
5. **Visits.** The number of visits is ``Geometric(1 / mean_visits_per_patient)`` (so >= 1),
   capped at ``max_visits``. Codes per visit are ``1 + NegativeBinomial`` with mean
   ``mean_codes_per_visit - 1`` and shape ``codes_dispersion``, capped at
   ``max_codes_per_visit``.
6. **Codes.** Each code slot comes, with probability ``cluster_share``, from one of the
   patient's clusters (uniformly chosen) by its within-cluster distribution; otherwise from the
   background: the ``background_size`` codes outside every cluster, ranked in a seeded order
   that favours common chapters, with probability ``(rank + zipf_offset) ** -zipf_exponent``
   (Zipf-Mandelbrot: a flat head, so cluster leads such as 4019 stay the most frequent) x a
   chapter-by-age-band factor (e.g. perinatal codes dominate the newborn background, then
   congenital and V codes; circulatory codes and neoplasms grow with age, injuries peak in the
   young). As the background holds no cluster code, a cluster's codes appear only in patients
   who carry that cluster (``SimulatedCorpus.patient_clusters``). Both draws are restricted to
   the group's allowed codes (equivalent to resampling invalid draws, but vectorised).
   A code already in the visit is redrawn (from the background after a few tries), so visits
   are duplicate-free.

Patients are named ``S000001, S000002, ...`` (zero-padded, so sorting by id keeps their order).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, model_validator

from app.corpus import AGE_CAP, SEXES, Corpus, Patient
from app.icd9.codes import category_of
from app.icd9.edits import load_edits
from app.icd9.hierarchy import CHAPTERS, chapter_of, load_hierarchy

__all__ = [
    "AGE_BANDS",
    "PRESETS",
    "Cluster",
    "SimulatedCorpus",
    "SimulationConfig",
    "default_clusters_path",
    "simulate_corpus",
    "write_generic",
]


class SimulationConfig(BaseModel):
    """Parameters of the generative process (see the module docstring for how each is used)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str  # preset name; the corpus source is "simulated:<name>"
    n_patients: int  # number of patients
    n_clusters: int  # comorbidity clusters (curated first, then generated)
    mean_codes_per_visit: float  # mean codes per visit before de-duplication and the cap
    mean_visits_per_patient: float  # mean of the geometric number of visits (>= 1)
    zipf_exponent: float  # background exponent s: p(rank r) ~ (r + q) ** -s, r = 1, 2, ...
    zipf_offset: float  # background offset q (Zipf-Mandelbrot): flattens the background head
    background_size: int  # number of real codes outside clusters in the background
    cluster_share: float  # probability a code slot is drawn from the patient's clusters
    cluster_zipf: float  # within-cluster exponent: p(i-th code) ~ (i + 1) ** -cluster_zipf
    cluster_prevalence_zipf: float  # cluster k's base weight is (k + 1) ** -this
    cluster_max_codes: int  # at most this many codes per cluster
    clusters_per_patient: tuple[float, float, float]  # P(1), P(2), P(3) clusters per patient
    age_leak: float  # weight factor of a cluster outside its age range (not newborn-only ones)
    other_sex_factor: float  # weight factor of a cluster for the sex it does not favour
    codes_dispersion: float  # negative-binomial shape of codes per visit (smaller: wider)
    max_codes_per_visit: int  # cap on codes per visit (MIMIC-III has 39)
    max_visits: int  # cap on visits per patient
    newborn_share: float  # share of patients aged 0 (MIMIC-III: ~17% neonates)
    child_share: float  # share of patients aged 1-17
    adult_age_mean: float  # adults: normal mean, years
    adult_age_sd: float  # adults: normal standard deviation, years
    male_share: float  # share of male patients

    @model_validator(mode="after")
    def _consistent(self) -> SimulationConfig:
        if self.n_patients < 1 or self.n_clusters < 1 or self.background_size < 1:
            raise ValueError("n_patients, n_clusters and background_size must be positive")
        if self.mean_codes_per_visit < 1 or self.mean_visits_per_patient < 1:
            raise ValueError("mean codes per visit and mean visits per patient must be >= 1")
        p = self.clusters_per_patient
        if len(p) != 3 or min(p) < 0 or abs(sum(p) - 1) > 1e-9:
            raise ValueError("clusters_per_patient must be three probabilities summing to 1")
        if not 0 <= self.newborn_share + self.child_share <= 1:
            raise ValueError("newborn_share + child_share must lie in [0, 1]")
        return self


PRESETS: dict[str, SimulationConfig] = {
    # Small, broad population (all ages, both sexes, a few newborns): the first-run default.
    "demo": SimulationConfig(
        name="demo", n_patients=2_000, n_clusters=16, mean_codes_per_visit=5.5,
        mean_visits_per_patient=1.5, zipf_exponent=1.2, zipf_offset=20.0, background_size=3_000,
        cluster_share=0.55, cluster_zipf=1.0, cluster_prevalence_zipf=0.8, cluster_max_codes=25,
        clusters_per_patient=(0.5, 0.35, 0.15), age_leak=0.03, other_sex_factor=0.4,
        codes_dispersion=4.0, max_codes_per_visit=20, max_visits=12, newborn_share=0.05,
        child_share=0.10, adult_age_mean=55.0, adult_age_sd=18.0, male_share=0.5,
    ),
    # MIMIC-III v1.4 shape: 46,520 patients (~17% neonates, 56% male, adult median ~65),
    # ~1.27 admissions per patient, ~7k distinct codes; ~9 codes per visit as the issue asks.
    "mimic3-scale": SimulationConfig(
        name="mimic3-scale", n_patients=46_520, n_clusters=40, mean_codes_per_visit=9.0,
        mean_visits_per_patient=1.3, zipf_exponent=1.6, zipf_offset=100.0, background_size=6_500,
        cluster_share=0.45, cluster_zipf=1.0, cluster_prevalence_zipf=0.8, cluster_max_codes=40,
        clusters_per_patient=(0.4, 0.35, 0.25), age_leak=0.03, other_sex_factor=0.4,
        codes_dispersion=3.0, max_codes_per_visit=39, max_visits=30, newborn_share=0.17,
        child_share=0.005, adult_age_mean=63.0, adult_age_sd=17.0, male_share=0.56,
    ),
    # Long histories shaped like CMS DE-SynPUF claims (one visit per claim): Medicare ages,
    # ~50 visits per patient of ~2 codes (claims carry up to 10), up to ~850 tokens, so about
    # one patient in ten is longer than the recipe's 512 positions (the long-patient benchmark).
    "claims-scale": SimulationConfig(
        name="claims-scale", n_patients=10_000, n_clusters=30, mean_codes_per_visit=2.2,
        mean_visits_per_patient=53.0, zipf_exponent=1.4, zipf_offset=60.0,
        background_size=4_000, cluster_share=0.5, cluster_zipf=1.0,
        cluster_prevalence_zipf=0.8, cluster_max_codes=30,
        clusters_per_patient=(0.3, 0.4, 0.3), age_leak=0.03, other_sex_factor=0.4,
        codes_dispersion=2.0, max_codes_per_visit=10, max_visits=200, newborn_share=0.0,
        child_share=0.0, adult_age_mean=72.0, adult_age_sd=9.0, male_share=0.45,
    ),
}


@dataclass(frozen=True)
class Cluster:
    """One ground-truth comorbidity cluster."""

    id: int
    name: str
    codes: tuple[str, ...]  # most probable first
    weights: tuple[float, ...]  # within-cluster probability of each code (sums to 1)
    categories: tuple[str, ...]  # the 3-character categories it was built from
    sex: str | None  # sex it favours ("F"/"M"), None for either
    age_range: tuple[int, int]  # inclusive age range it favours, years
    base_weight: float  # prevalence weight before age/sex factors
    affinity: str  # human-readable sex/age affinity, e.g. "ages 45-90, mostly male"

    def to_dict(self) -> dict:
        out = asdict(self)
        out["codes"] = list(self.codes)
        out["weights"] = [round(w, 6) for w in self.weights]
        out["categories"] = list(self.categories)
        out["age_range"] = list(self.age_range)
        return out


@dataclass
class SimulatedCorpus:
    """A simulated corpus with its ground truth: the clusters, and which clusters each patient
    carries (``patient_clusters[i]`` for ``corpus.patients[i]``, cluster ids)."""

    corpus: Corpus
    clusters: list[Cluster]
    config: SimulationConfig
    seed: int = 0
    build_seconds: float = 0.0
    patient_clusters: list[tuple[int, ...]] = field(default_factory=list)  # per patient, ids

    def clusters_to_json(self) -> str:
        """The ground truth as JSON: source, seed, config and the clusters (ids, codes, weights,
        affinities)."""
        payload = {
            "source": self.corpus.source,
            "seed": self.seed,
            "config": self.config.model_dump(),
            "clusters": [c.to_dict() for c in self.clusters],
        }
        return json.dumps(payload, indent=1)


# --- demographic groups -------------------------------------------------------------------

# Lower edges of the age bands; they include every MCE breakpoint (0, 1, 12, 15, 18, 56), so
# whether a code passes the edits is constant within a band.
AGE_BANDS: tuple[int, ...] = (0, 1, 12, 15, 18, 45, 56, 65, 80)
_N_GROUPS = len(AGE_BANDS) * len(SEXES)
_PERINATAL = CHAPTERS[14]


def _band_of(ages: np.ndarray) -> np.ndarray:
    return np.searchsorted(np.asarray(AGE_BANDS), np.floor(ages).astype(int), side="right") - 1


def _group_of(ages: np.ndarray, is_male: np.ndarray) -> np.ndarray:
    return _band_of(ages) * 2 + is_male.astype(int)


# Background chapter factors by age band (columns follow AGE_BANDS); chapters not listed are 1
# (0.002 at age 0, where perinatal, congenital and V codes dominate).
_CHAPTER_AGE: dict[int, tuple[float, ...]] = {
    0: (0.05, 1.5, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0),  # infections
    1: (0.001, 0.1, 0.1, 0.2, 0.5, 1.0, 1.3, 1.5, 1.5),  # neoplasms
    6: (0.002, 0.1, 0.1, 0.2, 0.5, 1.2, 1.5, 2.0, 2.0),  # circulatory
    10: (0.0, 0.0, 0.3, 1.0, 1.0, 0.3, 0.0, 0.0, 0.0),  # pregnancy (MCE masks the rest)
    13: (0.3, 3.0, 2.0, 2.0, 0.3, 0.2, 0.2, 0.2, 0.2),  # congenital anomalies
    14: (5.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0),  # perinatal
    16: (0.002, 2.0, 2.0, 2.0, 2.0, 1.0, 1.0, 1.0, 1.2),  # injury
    17: (0.1, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0),  # V codes
    18: (0.001, 2.0, 2.0, 2.0, 2.0, 1.0, 1.0, 1.0, 1.2),  # E codes (external causes)
}
# Prior of a chapter's codes to rank high in the background order (common ICU chapters first).
_CHAPTER_PRIOR: dict[int, float] = {
    2: 3.0, 3: 3.0, 6: 3.0, 7: 2.0, 8: 2.0, 9: 2.0, 15: 3.0, 17: 2.0,
    10: 0.3, 13: 0.3, 14: 0.5, 18: 0.5,
}


@dataclass(frozen=True)
class _Universe:
    codes: np.ndarray  # billable codes (str)
    chapter: np.ndarray  # chapter index per code
    category: np.ndarray  # category per code (str)
    allowed: np.ndarray  # (groups, codes) bool: passes MCE edits (and perinatal only at 0)


@lru_cache(maxsize=1)
def _universe() -> _Universe:
    codes = load_hierarchy().billable_codes
    edits = load_edits()
    chapter = np.array([chapter_of(c).index for c in codes])
    lo = np.array([edits.age_edits.get(c, (0, 999))[0] for c in codes])
    hi = np.array([edits.age_edits.get(c, (0, 999))[1] for c in codes])
    sex = np.array([edits.sex_edits.get(c, "") for c in codes])
    allowed = np.zeros((_N_GROUPS, len(codes)), dtype=bool)
    for b, age in enumerate(AGE_BANDS):
        for s, sx in enumerate(SEXES):
            ok = (lo <= age) & (age <= hi) & ((sex == "") | (sex == sx))
            if age > 0:
                ok &= chapter != _PERINATAL.index
            allowed[b * 2 + s] = ok
    return _Universe(np.array(codes), chapter, np.array([category_of(c) for c in codes]),
                     allowed)


# --- clusters -----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Template:
    name: str
    ages: tuple[int, int]
    sex: str | None
    leads: tuple[str, ...]  # codes, most frequent first
    categories: tuple[str, ...]  # whole categories (codes not claimed by a lead elsewhere)


# Curated clusters, most important first (a preset with n clusters takes the first n, so the
# demo's 16 span newborns, pregnancy, sex-specific and elderly conditions).
_TEMPLATES: tuple[_Template, ...] = (
    _Template("Hypertension, diabetes and lipid disorders", (40, 90), None,
              ("4019", "25000", "2724", "2720", "25060", "27800", "3572", "25002"),
              ("401", "250", "272", "278")),
    _Template("Heart failure and atrial fibrillation", (55, 90), None,
              ("4280", "42731", "4240", "V5861", "42732", "4168", "42789", "78551"),
              ("427", "428", "424", "425", "416")),
    _Template("Newborn care", (0, 0), None,
              ("V3000", "V053", "V3001", "V290", "V502", "V301"),
              ("V30", "V31", "V05", "V29", "V32", "V33", "V34", "V39")),
    _Template("Pregnancy and delivery", (15, 45), "F",
              ("V270", "64891", "64421", "64511", "64291", "65421", "65971"),
              ("V27", "V22", "V23", "642", "644", "645", "648", "654", "659", "664")),
    _Template("Coronary artery disease", (45, 90), "M",
              ("41401", "41071", "412", "4111", "V4581", "V4582", "4139", "41041"),
              ("410", "411", "412", "413", "414")),
    _Template("Acute and chronic kidney disease", (50, 90), None,
              ("5849", "5859", "40390", "40391", "5856", "V4511", "5845", "5853"),
              ("584", "585", "586", "403", "588")),
    _Template("Sepsis and shock", (18, 90), None,
              ("0389", "99592", "78552", "99591", "2762", "03842", "03811", "78559"),
              ("038",)),
    _Template("Pneumonia and respiratory failure", (18, 90), None,
              ("51881", "486", "5070", "5119", "4829", "51884", "48241", "5180"),
              ("480", "481", "482", "483", "485", "486", "487", "507", "511", "518")),
    _Template("Prematurity and neonatal jaundice", (0, 0), None,
              ("7742", "76519", "7706", "77931", "76528", "76518", "77181", "7795"),
              ("764", "765", "769", "770", "771", "774", "775", "776", "779")),
    _Template("Prostate and male genital disorders", (50, 90), "M",
              ("60000", "185", "V1046", "6010", "60001", "6071", "6089", "6021"),
              ("185", "600", "601", "602", "607", "608")),
    _Template("Breast and gynecologic cancer", (35, 90), "F",
              ("1749", "V103", "1830", "1820", "1800", "1748", "1744", "1833"),
              ("174", "179", "180", "182", "183", "184")),
    _Template("Liver disease and alcohol dependence", (30, 70), "M",
              ("5715", "5712", "30390", "5723", "2911", "07054", "4560", "5722"),
              ("571", "572", "303", "291", "456", "070")),
    _Template("Depression, anxiety and psychosis", (18, 65), None,
              ("311", "30000", "29620", "2989", "29690", "30981", "29570", "30001"),
              ("295", "296", "298", "300", "309", "311")),
    _Template("Head injury and road trauma", (16, 50), "M",
              ("85200", "8600", "80701", "E8120", "8052", "86121", "E8160", "80126"),
              ("800", "801", "803", "850", "851", "852", "853", "854", "860", "861", "807",
               "805", "E812", "E813", "E816", "E819")),
    _Template("Congenital heart disease", (0, 17), None,
              ("7470", "7455", "7454", "7461", "74710", "7463", "74561", "74781"),
              ("745", "746", "747")),
    _Template("Asthma and childhood respiratory infections", (1, 17), None,
              ("49390", "4659", "49392", "4660", "46619", "460", "49300", "4658"),
              ("493", "460", "465", "466")),
    _Template("Stroke and cerebrovascular disease", (55, 90), None,
              ("431", "43491", "430", "4321", "43411", "43310", "34290", "43820"),
              ("430", "431", "432", "433", "434", "436", "438", "342")),
    _Template("Metastatic and solid cancer", (45, 90), None,
              ("1977", "1983", "1970", "1985", "1991", "1629", "1579", "1539"),
              ("196", "197", "198", "199", "162", "153", "155", "157")),
    _Template("Chronic obstructive pulmonary disease", (45, 90), None,
              ("496", "49121", "3051", "V1582", "4928", "49122", "4919", "49120"),
              ("490", "491", "492", "494", "496")),
    _Template("Gastrointestinal bleeding and ulcer", (40, 90), None,
              ("5789", "2851", "5781", "5780", "53100", "53240", "56212", "2800"),
              ("578", "531", "532", "533", "535", "562", "280")),
    _Template("Thyroid and adrenal disorders", (30, 90), "F",
              ("2449", "2441", "24200", "2550", "24290", "2410", "2451", "2510"),
              ("240", "241", "242", "244", "245", "246", "255")),
    _Template("Anemia and coagulation disorders", (30, 90), None,
              ("2859", "2875", "28489", "2869", "2866", "28529", "2811", "2863"),
              ("281", "284", "285", "286", "287")),
    _Template("Dementia and Parkinson's disease", (70, 90), None,
              ("2948", "3310", "29410", "3320", "2900", "29420", "2903", "33182"),
              ("290", "294", "331", "332")),
    _Template("Hip fracture and falls", (65, 90), "F",
              ("82021", "E8889", "82009", "73300", "E8859", "8208", "82020", "E8849"),
              ("820", "821", "733", "E884", "E885", "E888")),
    _Template("Pressure ulcers and skin infections", (60, 90), None,
              ("70703", "6826", "70705", "70725", "6829", "70722", "6822", "70724"),
              ("707", "681", "682")),
    _Template("HIV and opportunistic infections", (25, 60), "M",
              ("042", "1363", "1120", "1175", "1301", "1304", "1361", "1123"),
              ("042", "136", "112", "117", "130")),
    _Template("Drug use disorders", (18, 60), "M",
              ("30500", "30400", "30560", "30550", "30470", "30590", "30420", "30520"),
              ("304", "305")),
    _Template("Seizure disorders", (5, 70), None,
              ("78039", "3453", "34590", "34510", "34591", "3452", "34550", "34511"),
              ("345",)),
    _Template("Osteoarthritis and back disorders", (50, 90), "F",
              ("71590", "71536", "7242", "7245", "71596", "72402", "7241", "71535"),
              ("715", "716", "724")),
    _Template("Female genitourinary disorders", (18, 60), "F",
              ("6262", "6259", "6140", "6181", "6202", "6271", "6268", "6170"),
              ("614", "617", "618", "620", "625", "626", "627")),
    _Template("Venous thromboembolism", (40, 90), None,
              ("41519", "45340", "45341", "V1251", "45342", "45111", "41511", "45382"),
              ("415", "451", "453")),
    _Template("Urinary tract infection and retention", (60, 90), "F",
              ("5990", "78820", "59970", "78830", "5991", "78829", "5992", "78821"),
              ("599", "788")),
)

# Adjacent-category generated clusters: the age range and sex they favour are drawn from these.
_GENERATED_AGES = ((18, 90), (40, 90), (60, 90), (18, 50), (1, 17))
_GENERATED_AGE_P = (0.3, 0.3, 0.2, 0.15, 0.05)


def _affinity(ages: tuple[int, int], sex: str | None) -> str:
    age = "newborns (age 0) only" if ages == (0, 0) else f"ages {ages[0]}-{ages[1]}"
    who = {"F": "mostly female", "M": "mostly male", None: "either sex"}[sex]
    return f"{age}, {who}"


def _build_clusters(config: SimulationConfig, uni: _Universe,
                    rng: np.random.Generator) -> tuple[list[Cluster], np.ndarray]:
    """The clusters and, per cluster, an int array of its codes' positions in ``uni.codes``."""
    index = {c: i for i, c in enumerate(uni.codes.tolist())}
    by_category: dict[str, list[int]] = {}
    for i, cat in enumerate(uni.category.tolist()):
        by_category.setdefault(cat, []).append(i)
    templates = list(_TEMPLATES[: config.n_clusters])
    claimed: dict[int, int] = {}  # code index -> cluster id
    # Leads first, so a lead's cluster keeps it even where another claims its category.
    members: list[list[int]] = [[] for _ in templates]
    for k, t in enumerate(templates):
        for code in t.leads:
            if code not in index:
                raise ValueError(f"cluster template {t.name!r}: {code} is not a billable code")
            i = index[code]
            if i not in claimed:
                claimed[i] = k
                members[k].append(i)
    for k, t in enumerate(templates):
        pool = [i for cat in t.categories for i in by_category.get(cat, []) if i not in claimed]
        pool = [pool[j] for j in rng.permutation(len(pool))]
        room = max(config.cluster_max_codes - len(members[k]), 0)
        for i in pool[:room]:
            claimed[i] = k
            members[k].append(i)
    specs = [(t.name, t.categories, t.ages, t.sex) for t in templates]

    # Generated clusters: runs of adjacent untouched categories within one chapter.
    claimed_cats = {uni.category[i] for i in claimed} | {c for t in templates for c in t.categories}
    cats = sorted(by_category)
    chapter_of_cat = {cat: int(uni.chapter[by_category[cat][0]]) for cat in cats}
    skip_chapters = {10, 14}  # pregnancy and perinatal belong to curated, demographic clusters
    while len(specs) < config.n_clusters:
        free = [j for j, cat in enumerate(cats) if cat not in claimed_cats
                and chapter_of_cat[cat] not in skip_chapters and len(by_category[cat]) >= 2]
        if not free:
            break
        start = free[int(rng.integers(len(free)))]
        run = [cats[start]]
        want = int(rng.integers(2, 5))
        j = start + 1
        while len(run) < want and j < len(cats) and cats[j] not in claimed_cats \
                and chapter_of_cat[cats[j]] == chapter_of_cat[cats[start]]:
            run.append(cats[j])
            j += 1
        claimed_cats.update(run)
        k = len(specs)
        pool = [i for cat in run for i in by_category[cat] if i not in claimed]
        pool = [pool[j] for j in rng.permutation(len(pool))][: config.cluster_max_codes]
        members.append(pool)
        for i in pool:
            claimed[i] = k
        chapter = CHAPTERS[chapter_of_cat[run[0]]]
        ages = _GENERATED_AGES[int(rng.choice(len(_GENERATED_AGES), p=_GENERATED_AGE_P))]
        sex = None if rng.random() < 0.7 else SEXES[int(rng.integers(2))]
        span = run[0] if len(run) == 1 else f"{run[0]}-{run[-1]}"
        specs.append((f"{chapter.title} ({span})", tuple(run), ages, sex))

    clusters = []
    for k, ((name, categories, ages, sex), idx) in enumerate(zip(specs, members)):
        w = np.arange(1, len(idx) + 1, dtype=float) ** -config.cluster_zipf
        w /= w.sum()
        clusters.append(Cluster(
            id=k, name=name, codes=tuple(uni.codes[idx].tolist()),
            weights=tuple(float(x) for x in w), categories=tuple(categories), sex=sex,
            age_range=ages, base_weight=float((k + 1) ** -config.cluster_prevalence_zipf),
            affinity=_affinity(ages, sex)))
    member_arrays = np.empty(len(members), dtype=object)
    for k, idx in enumerate(members):
        member_arrays[k] = np.asarray(idx, dtype=np.int64)
    return clusters, member_arrays


# --- sampling -----------------------------------------------------------------------------


class _SegmentSampler:
    """Draws from many small discrete distributions ("segments") at once.

    Segment ``s``'s cumulative probabilities are stored shifted by ``s`` in one sorted array, so
    one ``searchsorted`` of ``s + u`` draws from each requested segment.
    """

    def __init__(self, items: list[np.ndarray], weights: list[np.ndarray]) -> None:
        cdfs, self.mass = [], np.zeros(len(items))
        for s, w in enumerate(weights):
            total = float(w.sum())
            self.mass[s] = total
            cdf = np.cumsum(w) / total if total > 0 else np.zeros(len(w))
            if len(cdf) and total > 0:
                cdf[-1] = 1.0  # guard against rounding spilling into the next segment
            cdfs.append(cdf + s)
        self.cdf = np.concatenate(cdfs) if cdfs else np.zeros(0)
        self.items = np.concatenate(items) if items else np.zeros(0, dtype=np.int64)

    def sample(self, segments: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        pos = np.searchsorted(self.cdf, segments + rng.random(segments.size), side="right")
        return self.items[np.minimum(pos, self.items.size - 1)]


def _resolve(preset: str | SimulationConfig) -> SimulationConfig:
    if isinstance(preset, SimulationConfig):
        return preset
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[preset]


def simulate_corpus(preset: str | SimulationConfig = "demo", seed: int = 0) -> SimulatedCorpus:
    """Simulate a corpus (see the module docstring); the same preset and seed give the same
    corpus and clusters."""
    started = time.perf_counter()
    config = _resolve(preset)
    rng = np.random.default_rng(seed)
    uni = _universe()
    n_codes_total = uni.codes.size
    clusters, members = _build_clusters(config, uni, rng)
    n_clusters = len(clusters)

    # Background: codes outside clusters, ranked by a chapter-weighted random order.
    in_cluster = np.zeros(n_codes_total, dtype=bool)
    for idx in members:
        in_cluster[idx] = True
    outside = np.flatnonzero(~in_cluster)
    prior = np.array([_CHAPTER_PRIOR.get(int(c), 1.0) for c in uni.chapter[outside]])
    keys = np.log(prior) + rng.gumbel(size=outside.size)  # Gumbel top-k: weighted permutation
    ranked = outside[np.argsort(-keys, kind="stable")][: config.background_size]
    bg_weight = (np.arange(1, ranked.size + 1) + config.zipf_offset) ** -config.zipf_exponent
    chapter_age = np.ones((len(CHAPTERS), len(AGE_BANDS)))
    chapter_age[:, 0] = 0.002
    for chapter, factors in _CHAPTER_AGE.items():
        chapter_age[chapter] = factors
    bg_items, bg_weights = [], []
    for g in range(_N_GROUPS):
        w = bg_weight * chapter_age[uni.chapter[ranked], g // 2] * uni.allowed[g, ranked]
        bg_items.append(ranked)
        bg_weights.append(w)
    background = _SegmentSampler(bg_items, bg_weights)

    # Cluster samplers: one segment per (cluster, group), restricted to allowed codes.
    cl_items, cl_weights = [], []
    for k, cluster in enumerate(clusters):
        w = np.asarray(cluster.weights)
        for g in range(_N_GROUPS):
            cl_items.append(members[k])
            cl_weights.append(w * uni.allowed[g, members[k]])
    cluster_sampler = _SegmentSampler(cl_items, cl_weights)
    usable = cluster_sampler.mass.reshape(n_clusters, _N_GROUPS)  # mass a group may use

    # Patients.
    n = config.n_patients
    is_male = rng.random(n) < config.male_share
    kind = rng.random(n)
    adult = np.clip(np.rint(rng.normal(config.adult_age_mean, config.adult_age_sd, n)), 18,
                    AGE_CAP)
    child = rng.integers(1, 18, n).astype(float)
    ages = np.where(kind < config.newborn_share, 0.0,
                    np.where(kind < config.newborn_share + config.child_share, child, adult))
    group = _group_of(ages, is_male)

    # Cluster choice: Gumbel top-k over per-patient weights, k of 1-3.
    lo = np.array([c.age_range[0] for c in clusters])
    hi = np.array([c.age_range[1] for c in clusters])
    inside = (ages[:, None] >= lo) & (ages[:, None] <= hi)
    # No leak across the newborn line: neonates get only neonatal clusters and vice versa.
    leak = np.where((hi[None, :] == 0) | (ages[:, None] < 1), 0.0, config.age_leak)
    sex_factor = np.ones((n, n_clusters))
    favours = np.array([{"F": 0, "M": 1}.get(c.sex, -1) for c in clusters])
    other = (favours[None, :] >= 0) & (favours[None, :] != is_male[:, None].astype(int))
    sex_factor[other] = config.other_sex_factor
    base = np.array([c.base_weight for c in clusters])
    weight = base * np.where(inside, 1.0, leak) * sex_factor * usable[:, group].T
    with np.errstate(divide="ignore"):
        keys = np.log(weight) + rng.gumbel(size=weight.shape)
    top = min(3, n_clusters)
    chosen = np.argsort(-keys, axis=1, kind="stable")[:, :top]
    k_wanted = rng.choice(np.arange(1, 4), size=n, p=np.asarray(config.clusters_per_patient))
    ok = (np.isfinite(np.take_along_axis(keys, chosen, axis=1))
          & (np.arange(top) < k_wanted[:, None]))
    n_chosen = ok.sum(axis=1)  # eligible ones come first, so the first n_chosen are the picks
    chosen = np.where(ok, chosen, -1)

    # Visits and code slots.
    n_visits = np.minimum(rng.geometric(1.0 / config.mean_visits_per_patient, n),
                          config.max_visits)
    visit_patient = np.repeat(np.arange(n), n_visits)
    shape = config.codes_dispersion
    extra = config.mean_codes_per_visit - 1.0
    per_visit = 1 + rng.negative_binomial(shape, shape / (shape + extra), visit_patient.size)
    per_visit = np.minimum(per_visit, config.max_codes_per_visit)
    slot_visit = np.repeat(np.arange(visit_patient.size), per_visit)
    slot_patient = visit_patient[slot_visit]
    slot_group = group[slot_patient]

    codes = np.empty(slot_visit.size, dtype=np.int64)

    def draw(slots: np.ndarray, cluster_p: float) -> None:
        """(Re)draw ``slots``: from a patient cluster with probability ``cluster_p``."""
        patient = slot_patient[slots]
        from_cluster = (rng.random(slots.size) < cluster_p) & (n_chosen[patient] > 0)
        pick = np.floor(rng.random(slots.size) * np.maximum(n_chosen[patient], 1)).astype(int)
        cl = chosen[patient, pick]
        c_slots = slots[from_cluster]
        codes[c_slots] = cluster_sampler.sample(cl[from_cluster] * _N_GROUPS
                                                + slot_group[c_slots], rng)
        b_slots = slots[~from_cluster]
        codes[b_slots] = background.sample(slot_group[b_slots], rng)

    draw(np.arange(codes.size), config.cluster_share)
    keep = np.ones(codes.size, dtype=bool)
    for attempt in range(50):
        key = slot_visit * n_codes_total + codes
        order = np.argsort(key, kind="stable")  # stable: the first occurrence stays
        dup = order[1:][key[order][1:] == key[order][:-1]]
        if dup.size == 0:
            break
        # A few tries from the same source, then the background (a small cluster can run out).
        draw(dup, config.cluster_share if attempt < 4 else 0.0)
    else:
        keep[dup] = False  # practically unreachable; dropping keeps visits duplicate-free

    # Assemble patients.
    # one shared string object per distinct code (as the loaders build them): a string per
    # occurrence was 58 MB of the claims-scale corpus's 98
    names = uni.codes.tolist()
    code_text = [names[c] for c in codes[keep].tolist()]
    sizes = np.bincount(slot_visit[keep], minlength=visit_patient.size)
    ends = np.cumsum(sizes)
    visit_codes = [tuple(code_text[e - s:e]) for s, e in zip(sizes.tolist(), ends.tolist())]
    width = max(6, len(str(n)))
    patients: list[Patient] = []
    sex_text = np.where(is_male, "M", "F").tolist()
    start = 0
    for p, nv in enumerate(n_visits.tolist()):
        patients.append(Patient(f"S{p + 1:0{width}d}", float(ages[p]), sex_text[p],
                                tuple(visit_codes[start:start + nv])))
        start += nv
    corpus = Corpus(source=f"simulated:{config.name}", patients=patients,
                    raw_counts={"patients": n, "visits": int(visit_patient.size),
                                "rows": int(keep.sum())})
    patient_clusters = [tuple(int(c) for c in row[row >= 0]) for row in chosen]
    return SimulatedCorpus(corpus=corpus, clusters=clusters, config=config, seed=seed,
                           build_seconds=time.perf_counter() - started,
                           patient_clusters=patient_clusters)


# --- writing ------------------------------------------------------------------------------

_EPOCH = np.datetime64("2100-01-01T00:00:00", "s")  # MIMIC-style shifted, obviously fake dates
_MEAN_GAP_DAYS = 120.0
_NEWBORN_GAP_DAYS = 7.0


def default_clusters_path(out: Path) -> Path:
    """Where the clusters of a corpus written to ``out`` go by default: ``<stem>.clusters.json``
    beside it, the stem without ``.csv``, ``.csv.gz``, ``.gz`` or ``.parquet``."""
    out = Path(out)
    name = out.name
    for suffix in (".csv.gz", ".gz", ".csv", ".parquet"):
        if name.lower().endswith(suffix) and len(name) > len(suffix):
            name = name[: -len(suffix)]
            break
    return out.with_name(f"{name}.clusters.json")


def write_generic(corpus: Corpus, path: Path, *, seed: int = 0) -> None:
    """Write ``corpus`` in the generic long format that :func:`load_generic` reads.

    One row per diagnosis: ``patient_id, visit_id, code, age, sex, visit_time``. CSV, gzipped
    when the name ends in ``.gz``, Parquet when it ends in ``.parquet``. Visit times are
    synthetic (seeded by ``seed``): a first visit between 2100 and 2110 and gaps of days to
    months, strictly increasing per patient. ``age`` is the age at each visit (the first is
    exactly the patient's age); a patient under 1 year keeps all visits within that year, so
    age-0 edits still hold at every visit. Loading the file gives back the same patients
    (ids, ages, sexes, visits and code order), in patient-id order.
    """
    path = Path(path)
    rng = np.random.default_rng(seed)
    patients = corpus.patients
    n = len(patients)
    n_visits = np.array([len(p.visits) for p in patients], dtype=np.int64)
    ages = np.array([p.age for p in patients], dtype=float)
    visit_patient = np.repeat(np.arange(n), n_visits)
    starts = np.cumsum(n_visits) - n_visits  # each patient's first visit
    first = np.zeros(visit_patient.size, dtype=bool)
    first[starts[n_visits > 0]] = True
    young = ages[visit_patient] < 1
    mean_gap = np.where(young, _NEWBORN_GAP_DAYS, _MEAN_GAP_DAYS)
    gap_days = np.where(first, 0.0, rng.geometric(1.0 / mean_gap) + rng.random(first.size))
    # Days since the patient's first visit: a running sum restarted at each first visit.
    total = np.cumsum(gap_days)
    has = n_visits > 0
    elapsed = total - np.repeat(total[starts[has]], n_visits[has])
    # Under-ones: squeeze the visits into the rest of their first year if they would spill over.
    room = (1.0 - ages) * 365.25 * 0.95
    span = np.zeros(n)
    np.maximum.at(span, visit_patient, elapsed)
    squeeze = np.where((ages < 1) & (span > room), room / np.maximum(span, 1e-9), 1.0)
    elapsed = elapsed * squeeze[visit_patient]
    start_day = rng.uniform(0, 3650, n)
    seconds = np.floor((start_day[visit_patient] + elapsed) * 86_400).astype(np.int64)
    times = _EPOCH + seconds.astype("timedelta64[s]")
    visit_age = np.where(first, ages[visit_patient],
                         np.minimum(np.round(ages[visit_patient] + elapsed / 365.25, 2), AGE_CAP))
    visit_age = np.where(young & ~first, np.minimum(visit_age, 0.99), visit_age)

    codes = [c for p in patients for v in p.visits for c in v]
    per_visit = np.array([len(v) for p in patients for v in p.visits], dtype=np.int64)
    row_visit = np.repeat(np.arange(visit_patient.size), per_visit)
    row_patient = visit_patient[row_visit]
    ids = np.array([p.patient_id for p in patients], dtype=object)
    sexes = np.array([p.sex for p in patients], dtype=object)
    frame = pd.DataFrame({
        "patient_id": ids[row_patient],
        "visit_id": 100_001 + row_visit,  # hadm_id-like, unique over the file
        "code": codes,
        "age": visit_age[row_visit],
        "sex": sexes[row_patient],
        "visit_time": times[row_visit],
    })
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.name.lower().endswith(".parquet"):
        frame.to_parquet(path, index=False)
    elif path.name.lower().endswith(".gz"):
        frame.to_csv(path, index=False,
                     compression={"method": "gzip", "compresslevel": 6, "mtime": 0})
    else:
        frame.to_csv(path, index=False)
