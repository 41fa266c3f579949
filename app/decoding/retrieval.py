"""The retrieval index of training patients and the privacy guard of ``retrieve_edit``.

The index holds, for every training patient, sex, age and visits as code ids (codes outside
the vocabulary dropped), sorted by (sex, age) for nearest-age lookup, a set of exact
signatures (visits in order, codes sorted inside each) and a sparse patients x codes incidence
matrix. The guard always rejects a candidate that equals a training patient visit for visit
(its own retrieved source included), and, where ``min_distance`` > 0, one whose code set lies
within that Jaccard distance of any training patient's. Both tests are the privacy metrics' own
(:mod:`app.similarity`: the exact-copy key and the nearest Jaccard distance).

On disk (a bundle's ``retrieval.npz``): ``sex`` int8, ``age`` float32, ``patient_ptr`` (patients
-> visits), ``visit_ptr`` (visits -> codes) and ``codes`` (int32 code ids).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from app.corpus import SEX_IDS, Patient
from app.similarity import CodeSetIndex, visits_key
from app.vocab import Vocabulary

__all__ = ["RetrievalIndex"]

class RetrievalIndex:
    def __init__(self, sex: np.ndarray, age: np.ndarray, patient_ptr: np.ndarray,
                 visit_ptr: np.ndarray, codes: np.ndarray, n_codes: int) -> None:
        self.sex = np.asarray(sex, dtype=np.int8)
        self.age = np.asarray(age, dtype=np.float32)
        self.patient_ptr = np.asarray(patient_ptr, dtype=np.int64)
        self.visit_ptr = np.asarray(visit_ptr, dtype=np.int64)
        self.codes = np.asarray(codes, dtype=np.int32)
        self.n_codes = int(n_codes)
        if self.patient_ptr.size != self.sex.size + 1 or self.age.size != self.sex.size:
            raise ValueError("retrieval index arrays disagree on the number of patients")
        self._by_sex = {s: np.flatnonzero(self.sex == s) for s in (0, 1)}
        for s, rows in self._by_sex.items():
            self._by_sex[s] = rows[np.argsort(self.age[rows], kind="stable")]
        self.signatures = {visits_key(self.visits(i)) for i in range(len(self))}
        # Patients x codes incidence (code sets over all visits).
        rows, cols = [], []
        for i in range(len(self)):
            cs = np.unique(self.codes[self.visit_ptr[self.patient_ptr[i]]:
                                      self.visit_ptr[self.patient_ptr[i + 1]]])
            rows.append(np.full(cs.size, i, dtype=np.int64))
            cols.append(cs.astype(np.int64))
        r = np.concatenate(rows) if rows else np.zeros(0, dtype=np.int64)
        c = np.concatenate(cols) if cols else np.zeros(0, dtype=np.int64)
        self.incidence = sp.csr_matrix((np.ones(r.size, dtype=np.float32), (r, c)),
                                       shape=(len(self), self.n_codes))
        self._code_sets = CodeSetIndex(self.incidence)

    # -- construction and persistence ---------------------------------------------------------
    @classmethod
    def from_patients(cls, patients: Sequence[Patient], vocab: Vocabulary) -> RetrievalIndex:
        sex, age, patient_ptr, visit_ptr, codes = [], [], [0], [0], []
        offset = vocab.n_special
        for p in patients:
            for visit in p.visits:
                ids = [vocab.index[c] - offset for c in visit if c in vocab.index]
                if not ids:
                    continue
                codes.extend(ids)
                visit_ptr.append(len(codes))
            if len(visit_ptr) - 1 == patient_ptr[-1]:
                continue  # no in-vocabulary code at all
            sex.append(SEX_IDS[p.sex])
            age.append(p.age)
            patient_ptr.append(len(visit_ptr) - 1)
        return cls(np.asarray(sex), np.asarray(age), np.asarray(patient_ptr),
                   np.asarray(visit_ptr), np.asarray(codes), vocab.n_codes)

    @classmethod
    def from_records(cls, records: Sequence[dict], vocab: Vocabulary) -> RetrievalIndex:
        """From a bundle's ``train_index.json.gz`` records (``id, age, sex, visits``)."""
        patients = [Patient(str(r.get("id", i)), float(r["age"]), str(r["sex"]),
                            tuple(tuple(v) for v in r["visits"])) for i, r in enumerate(records)]
        return cls.from_patients(patients, vocab)

    def save(self, path: str | Path) -> None:
        np.savez_compressed(path, sex=self.sex, age=self.age, patient_ptr=self.patient_ptr,
                            visit_ptr=self.visit_ptr, codes=self.codes,
                            n_codes=np.int64(self.n_codes))

    @classmethod
    def load(cls, path: str | Path, vocab: Vocabulary | None = None) -> RetrievalIndex:
        with np.load(path) as data:
            index = cls(data["sex"], data["age"], data["patient_ptr"], data["visit_ptr"],
                        data["codes"], int(data["n_codes"]))
        if vocab is not None and index.n_codes != vocab.n_codes:
            raise ValueError(f"{path}: retrieval index has {index.n_codes} codes, vocabulary "
                             f"{vocab.n_codes}")
        return index

    # -- lookups ------------------------------------------------------------------------------
    def __len__(self) -> int:
        return int(self.sex.size)

    def visits(self, i: int) -> list[list[int]]:
        """Visits of training patient ``i`` as code ids."""
        lo, hi = self.patient_ptr[i], self.patient_ptr[i + 1]
        return [self.codes[self.visit_ptr[v]:self.visit_ptr[v + 1]].tolist()
                for v in range(lo, hi)]

    def nearest(self, age: float, sex: int, k: int) -> np.ndarray:
        """Up to ``k`` same-sex patients nearest in age (ties broken by index order)."""
        rows = self._by_sex.get(int(sex))
        if rows is None or rows.size == 0:
            return np.zeros(0, dtype=np.int64)
        ages = self.age[rows]
        at = int(np.searchsorted(ages, age))
        lo, hi = max(0, at - k), min(rows.size, at + k)
        window = rows[lo:hi]
        order = np.argsort(np.abs(self.age[window] - np.float32(age)), kind="stable")
        return window[order[:k]]

    # -- privacy guard ------------------------------------------------------------------------
    def is_copy(self, visits: Sequence[Sequence[int]]) -> bool:
        """Equal, visit for visit (codes in any order), to some training patient."""
        return visits_key(visits) in self.signatures

    def nearest_distance(self, code_sets: Sequence[Sequence[int]]) -> np.ndarray:
        """Smallest Jaccard distance from each code set to any training patient's code set."""
        if not code_sets or len(self) == 0:
            return np.ones(len(code_sets), dtype=np.float64)
        rows = np.concatenate([np.full(len(set(s)), i) for i, s in enumerate(code_sets)])
        cols = np.concatenate([np.fromiter(sorted(set(s)), dtype=np.int64, count=len(set(s)))
                               for s in code_sets])
        query = sp.csr_matrix((np.ones(rows.size, dtype=np.float32), (rows, cols)),
                              shape=(len(code_sets), self.n_codes))
        return self._code_sets.distance(query)
