"""Resident memory each added bundle costs a service process (``SYNTHEHR_BUNDLES``).

    python bench/bundle_memory.py BUNDLE [BUNDLE ...] [--copies N]

Loads the bundles one after the other into one :class:`app.runtime.bundles.GeneratorSet` (each
also generates 8 patients, so ONNX Runtime's arenas are warm), and prints the process's RSS
(``VmRSS``) before and after each, with the increments. ``--copies N`` loads N copies of each
bundle (copied into a temporary folder under distinct names) to show the per-bundle cost.
"""

from __future__ import annotations

import argparse
import gc
import shutil
import tempfile
from pathlib import Path


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundles", nargs="+", type=Path)
    parser.add_argument("--copies", type=int, default=1)
    args = parser.parse_args()

    from app.runtime.bundles import GeneratorSet
    from app.runtime.generators import load_generator

    with tempfile.TemporaryDirectory(prefix="bundle-memory-") as tmp:
        paths = []
        for path in args.bundles:
            for k in range(args.copies):
                target = Path(tmp) / f"{path.name}-{k}"
                shutil.copytree(path, target)
                paths.append(target)
        import numpy  # noqa: F401 - the libraries every bundle shares are loaded first
        import onnxruntime  # noqa: F401

        gc.collect()
        before = rss_mib()
        print(f"process before any bundle: {before:.1f} MiB")
        generators = {}
        last = before
        for path in paths:
            generator = load_generator(path)
            generator.generate([(60.0, "F")] * 8, seed=1)
            generators[path.name] = generator
            gc.collect()
            now = rss_mib()
            size = sum(f.stat().st_size for f in path.iterdir()) / 2**20
            print(f"+ {path.name} ({size:.1f} MiB on disk): {now:.1f} MiB (+{now - last:.1f})")
            last = now
        GeneratorSet(generators)
        print(f"{len(paths)} bundles: +{last - before:.1f} MiB in all, "
              f"{(last - before) / len(paths):.1f} MiB per bundle")


if __name__ == "__main__":
    main()
