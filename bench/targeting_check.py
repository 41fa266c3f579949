"""Check a targeted cohort written by ``synthehr generate --format parquet``.

    python bench/targeting_check.py COHORT.parquet --exclude 4019 --any-of 250

Prints the patients, code rows, occurrences of every excluded code or category (expected 0) and
the patients carrying a code of the ``any_of`` codes or categories (expected: all).
"""

from __future__ import annotations

import argparse

import pyarrow.parquet as pq


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cohort")
    parser.add_argument("--exclude", default="", help="Comma-separated codes or categories.")
    parser.add_argument("--any-of", default="", help="Comma-separated codes or categories.")
    args = parser.parse_args()
    rows = pq.read_table(args.cohort, columns=["patient_id", "code"]).to_pandas()
    patients = rows["patient_id"].nunique()
    print(f"{patients:,} patients, {len(rows):,} code rows")
    for entry in filter(None, args.exclude.split(",")):
        print(f"exclude {entry}: {int(rows['code'].str.startswith(entry).sum())} occurrences")
    targets = tuple(filter(None, args.any_of.split(",")))
    if targets:
        hit = rows.loc[rows["code"].str.startswith(targets), "patient_id"].nunique()
        print(f"any_of {','.join(targets)}: {hit:,} of {patients:,} patients carry one")


if __name__ == "__main__":
    main()
