"""Load time and peak memory of the DE-SynPUF loader on a claims-shaped folder of a given size.

    .venv/bin/python bench/synpuf_load.py [--beneficiaries 5000] [--claims 250000] [--seed 0]

Writes a DE-SynPUF folder (the published column layout of ``tests/synpuf_fixture.py``; made-up
values: one 2008 Beneficiary Summary file, a Carrier claims file holding 90% of the claims and
an Outpatient file the rest, 1-8 ICD-9-CM codes per claim drawn from the CMS v32 code list,
dates over 2008-2010) into a temporary folder, loads it with ``load_corpus("synpuf", ...)`` in a
fresh process and prints the wall time, that process's peak RSS, and the corpus's patients,
visits and lengths. ``--folder DIR`` loads an existing DE-SynPUF folder instead.
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT, ROOT / "tests"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))


def write_folder(folder: Path, n_bene: int, n_claims: int, seed: int) -> None:
    from synpuf_fixture import BENEFICIARY, CARRIER, OUTPATIENT

    rng = np.random.default_rng(seed)
    table = ROOT / "app" / "icd9" / "data" / "CMS32_DESC_LONG_SHORT_DX.txt"
    pool = pd.read_csv(table, sep="|", encoding="latin-1", dtype=str).iloc[:, 0].to_numpy()
    # A skewed code distribution, as in claims: a few hundred codes carry most mentions.
    weights = 1.0 / np.arange(1, pool.size + 1) ** 1.1
    weights /= weights.sum()
    ids = np.array([f"{i:016X}" for i in range(n_bene)])
    bene = pd.DataFrame({"DESYNPUF_ID": ids,
                         "BENE_BIRTH_DT": [f"{y}0101" for y in rng.integers(1915, 1975, n_bene)],
                         "BENE_SEX_IDENT_CD": rng.choice(["1", "2"], n_bene)})
    bene.reindex(columns=BENEFICIARY).to_csv(
        folder / "DE1_0_2008_Beneficiary_Summary_File_Sample_1.csv", index=False)
    # Claims per beneficiary vary a lot (a few heavy users), as in the real files.
    owner = rng.choice(ids, n_claims, p=rng.dirichlet(np.full(n_bene, 0.5)))
    day = pd.Timestamp("2008-01-01") + pd.to_timedelta(rng.integers(0, 1095, n_claims), "D")
    n_codes = rng.integers(1, 9, n_claims)
    codes = rng.choice(pool, (n_claims, 8), p=weights)
    frame = pd.DataFrame({"DESYNPUF_ID": owner, "CLM_ID": np.arange(n_claims).astype(str),
                          "CLM_FROM_DT": day.strftime("%Y%m%d"),
                          "CLM_THRU_DT": day.strftime("%Y%m%d")})
    for k in range(8):
        frame[f"ICD9_DGNS_CD_{k + 1}"] = np.where(k < n_codes, codes[:, k], "")
    cut = int(n_claims * 0.9)
    frame.iloc[:cut].reindex(columns=CARRIER).to_csv(
        folder / "DE1_0_2008_to_2010_Carrier_Claims_Sample_1A.csv", index=False)
    frame.iloc[cut:].reindex(columns=OUTPATIENT).to_csv(
        folder / "DE1_0_2008_to_2010_Outpatient_Claims_Sample_1.csv", index=False)


def load(folder: Path) -> None:
    from app.corpus import corpus_stats, length_stats
    from training.loaders import load_corpus

    start = time.perf_counter()
    corpus = load_corpus("synpuf", folder)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    stats = corpus_stats(corpus.patients)
    lengths = length_stats(corpus.patients, 256)
    print(f"load {seconds:.1f} s, peak RSS {peak:.0f} MiB (the loading process, imports included)")
    print(f"patients {stats.patients:,}, visits {stats.visits:,}, code occurrences "
          f"{stats.codes:,}, mean visits per patient {stats.mean_visits_per_patient:.1f}")
    print(f"tokens p50/p90/p99/max {'/'.join(str(v) for v in lengths.token_percentiles.values())}"
          f", longer than 256: {lengths.over_limit:,}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--beneficiaries", type=int, default=5_000)
    p.add_argument("--claims", type=int, default=250_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--folder", type=Path, help="load this DE-SynPUF folder (nothing is written)")
    args = p.parse_args()
    if args.folder is not None:
        load(args.folder)
        return
    with tempfile.TemporaryDirectory() as tmp:
        write_folder(Path(tmp), args.beneficiaries, args.claims, args.seed)
        print(f"claims {args.claims:,}, beneficiaries {args.beneficiaries:,}", flush=True)
        subprocess.run([sys.executable, __file__, "--folder", tmp], check=True)


if __name__ == "__main__":
    main()
