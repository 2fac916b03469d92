#!/usr/bin/env python
"""Benchmarks of dask-merge check and open_merged: a script, not a test.

    python benchmarks/bench_check.py            # 5 repetitions
    python benchmarks/bench_check.py --repeat 3

check       16 realistic merged files (10,000 rows, 768 + 2560 wide, 133 MB each;
            one pair made with dask_merge.testing and merged with merge_pair,
            hard-linked under 16 names), warm in the page cache: ``cat`` of the
            files to /dev/null vs ``dask-merge check`` (interpreter start to
            exit, processes scheduler, 2 workers), run in turn, side by side.
open        open_merged of 1,000 merged files of 10 rows (written with the
            project's writer): the time to build the array (headers only),
            in a fresh process, vs the time to read the files whole.

Data goes to benchmarks/data/ (gitignored), results to benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
DATA = HERE / "data" / "check"
FILES, ROWS, TINY_FILES = 16, 10_000, 1_000


def outputs() -> list[str]:
    """The 16 merged files (made once)."""
    folder = DATA / "merged"
    paths = [str(folder / f"chunk_{i}_merged.pt") for i in range(FILES)]
    if all(os.path.exists(p) for p in paths):
        return paths
    from dask_merge import merge_pair
    from dask_merge.testing import make_pair

    folder.mkdir(parents=True, exist_ok=True)
    (DATA / "inputs").mkdir(exist_ok=True)
    pair = make_pair(DATA / "inputs", "big", rows=ROWS, nucleotide_only=200, protein_only=1)
    merge_pair(pair.nucleotide, pair.protein, paths[0], label="viral")
    for path in paths[1:]:
        if not os.path.exists(path):
            os.link(paths[0], path)
    return paths


def tiny_outputs() -> Path:
    """1,000 merged files of 10 rows (made once)."""
    import numpy as np

    from dask_merge.layouts import write_merged

    folder = DATA / "tiny"
    if len(list(folder.glob("*_merged.pt"))) != TINY_FILES:
        folder.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(0)
        for i in range(TINY_FILES):
            ids = [f"tiny_{i}_seq_{j}" for j in range(10)]
            write_merged(str(folder / f"t_{i}_merged.pt"), ids,
                         rng.standard_normal((10, 3328), np.float32), [1])
    return folder


def timed(command: list[str]) -> float:
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode not in (0, 1):
        raise SystemExit(f"{command[:4]} failed: {done.stderr}")
    return time.perf_counter() - start


OPEN_CHILD = """
import sys, time
start = time.perf_counter()
import dask_merge
merged = dask_merge.open_merged(sys.argv[1])
built = time.perf_counter() - start
assert merged.data.numblocks[0] == 1000
start = time.perf_counter()
for path in merged.files:
    with open(path, 'rb') as f:
        f.read()
print(built, time.perf_counter() - start)
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=5)
    repeat = parser.parse_args().repeat
    paths = outputs()
    folder = os.path.dirname(paths[0])
    tool = [sys.executable, "-m", "dask_merge", "check", "--output-dir", folder, "--no-progress",
            "--workers", "2"]
    cat = ["cat", *paths]
    subprocess.run(cat, stdout=subprocess.DEVNULL, check=True)  # warm the page cache
    runs = {"cat": [], "check": []}
    for _ in range(repeat):  # in turn: the machine's mood affects both alike
        with open(os.devnull, "wb") as null:
            start = time.perf_counter()
            subprocess.run(cat, stdout=null, check=True)
            runs["cat"].append(time.perf_counter() - start)
        runs["check"].append(timed(tool))
    ratios = [c / k for c, k in zip(runs["check"], runs["cat"])]
    tiny = tiny_outputs()
    opened = []
    for _ in range(repeat):
        out = subprocess.run([sys.executable, "-c", OPEN_CHILD, str(tiny)], capture_output=True,
                             text=True, check=True).stdout.split()
        opened.append(tuple(map(float, out)))
    result = {
        "cat_seconds": runs["cat"], "check_seconds": runs["check"], "check_over_cat": ratios,
        "open_1000_seconds": [o[0] for o in opened], "read_1000_seconds": [o[1] for o in opened],
        "bytes": sum(os.path.getsize(p) for p in paths),
    }
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / f"check-{time.strftime('%Y%m%d-%H%M%S')}.json").write_text(json.dumps(result))
    med = statistics.median
    print(f"check of {FILES} x {ROWS:,}-row files ({result['bytes'] / 1e9:.2f} GB), medians of {repeat}:")
    print(f"  cat > /dev/null      {med(runs['cat']):.2f} s  ({', '.join(f'{t:.2f}' for t in runs['cat'])})")
    print(f"  dask-merge check     {med(runs['check']):.2f} s  ({', '.join(f'{t:.2f}' for t in runs['check'])})")
    print(f"  check / cat          {med(ratios):.2f}x  ({', '.join(f'{r:.2f}' for r in ratios)})  goal <= 2x")
    print(f"open_merged of {TINY_FILES} files: {med(result['open_1000_seconds']):.3f} s "
          f"(including import dask_merge; reading them whole: {med(result['read_1000_seconds']):.3f} s)")


if __name__ == "__main__":
    main()
