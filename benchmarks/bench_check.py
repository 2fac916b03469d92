#!/usr/bin/env python
"""Benchmarks of dask-merge check and open_merged: a script, not a test.

    python benchmarks/bench_check.py            # 5 repetitions
    python benchmarks/bench_check.py --repeat 3
    python benchmarks/bench_check.py --baseline DIR   # also DIR's dask_merge, in turn

check       16 realistic merged files (10,000 rows, 768 + 2560 wide, 133 MB each;
            one pair made with dask_merge.testing and merged with merge_pair,
            hard-linked under 16 names), warm in the page cache: ``cat`` of the
            files to /dev/null vs ``dask-merge check`` (interpreter start to
            exit, processes scheduler, 2 workers), run in turn, side by side;
            with the fixed costs: the same check of one 10-row file, and
            ``python -c "import dask_merge"``.
open        open_merged of 1,000 merged files of 10 rows (written with the
            project's writer): the time to build the array (headers only),
            in a fresh process, vs the time to read the files whole.

With ``--baseline DIR`` (e.g. a ``git archive main`` of the commit before a
change), the check and open_merged also run with DIR's dask_merge, in turn
with the others.  Each figure comes with how busy the rest of the machine
was meanwhile (``others_cores``: the CPU time of other processes, from /proc).

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

from bench import in_turn

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


def one_small_output() -> str:
    """A folder of one merged file of 10 rows: a check of it is the command's fixed cost."""
    import shutil

    folder = HERE / "data" / "check-one"
    if not (folder / "t_0_merged.pt").exists():
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy(tiny_outputs() / "t_0_merged.pt", folder)
    return str(folder)


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


def _cpu_by_process() -> dict[int, float]:
    """CPU seconds of every other process, with its reaped children's, from /proc."""
    found = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                with open(f"/proc/{entry.name}/stat") as f:
                    fields = f.read().rpartition(")")[2].split()
            except OSError:  # gone meanwhile
                continue
            found[int(entry.name)] = sum(map(int, fields[11:15])) / os.sysconf("SC_CLK_TCK")
    return found


def _others_cores(before: dict[int, float], wall: float) -> float:
    """Cores used since ``before`` by the processes that were there then (not
    ours: a new one may be our fork server on its way out), with the children
    they reaped meanwhile."""
    after = _cpu_by_process()
    return sum(t - before[pid] for pid, t in after.items() if pid in before) / wall


def _reap_descendants() -> None:
    """Become the reaper of our orphaned descendants (the pool's fork server,
    which the check leaves to exit on its own), so that their CPU time counts
    as our children's."""
    import ctypes

    PR_SET_CHILD_SUBREAPER = 36
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


def timed(command: list[str], code: str | None = None, *,
          output: bool = False) -> tuple[float, float, float, str]:
    """Wall seconds of ``command`` (with ``code``'s dask_merge if given), the CPU seconds
    of it and all its descendants, the cores the rest of the machine used meanwhile, and
    its stdout if ``output`` (else to /dev/null)."""
    env = {**os.environ, "PYTHONPATH": code} if code else None
    before, cpu, start = _cpu_by_process(), os.times(), time.perf_counter()
    # Not from this checkout's folder: ``python -m`` would import its
    # dask_merge, the baseline's PYTHONPATH notwithstanding.
    done = subprocess.run(command, stdout=subprocess.PIPE if output else subprocess.DEVNULL,
                          stderr=subprocess.PIPE, env=env, cwd=code or DATA)
    wall = time.perf_counter() - start
    others = _others_cores(before, wall)
    while True:  # the fork server, on its way out: reaped, its CPU (and its workers') counted
        try:
            os.waitpid(-1, 0)
        except ChildProcessError:
            break
    if done.returncode not in (0, 1):
        raise SystemExit(f"{command[:4]} failed: {done.stderr.decode()}")
    used = sum(os.times()[2:4]) - sum(cpu[2:4])
    return wall, used, others, done.stdout.decode() if output else ""


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
    parser.add_argument("--baseline", metavar="DIR", help="also run DIR's dask_merge, in turn")
    options = parser.parse_args()
    paths = outputs()
    folder = os.path.dirname(paths[0])
    tool = [sys.executable, "-m", "dask_merge", "check", "--output-dir", folder, "--no-progress",
            "--workers", "2"]
    fixed = [*tool[:5], one_small_output(), *tool[6:]]
    variants = {"cat": (["cat", *paths], None), "check": (tool, None),
                "check of 1 small file": (fixed, None),
                "import dask_merge": ([sys.executable, "-c", "import dask_merge"], None)}
    if options.baseline:
        variants["check [baseline]"] = (tool, options.baseline)
        variants["check of 1 small file [baseline]"] = (fixed, options.baseline)
    subprocess.run(["cat", *paths], stdout=subprocess.DEVNULL, check=True)  # warm the page cache
    _reap_descendants()
    runs, cpu, load = ({name: [] for name in variants} for _ in range(3))
    for repetition in range(options.repeat):  # in turn: the machine's mood affects all alike
        for name in in_turn(variants, repetition):
            command, code = variants[name]
            wall, used, others, _ = timed(command, code)
            runs[name].append(wall)
            cpu[name].append(used)
            load[name].append(others)
    ratios = {name: [c / k for c, k in zip(runs[name], runs["cat"])] for name in variants
              if name.startswith("check") and "small" not in name}
    opened = _open_merged(options.repeat, options.baseline)
    result = {"seconds": runs, "cpu_seconds": cpu, "others_cores": load, "over_cat": ratios, "open_merged": opened,
              "bytes": sum(os.path.getsize(p) for p in paths)}
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / f"check-{time.strftime('%Y%m%d-%H%M%S')}.json").write_text(json.dumps(result))
    _print(result, options.repeat)


def _open_merged(repeat: int, baseline: str | None) -> dict[str, list[tuple[float, float, float]]]:
    """(build, read whole, others' cores, CPU seconds of the process) of open_merged of the tiny files, in fresh processes."""
    tiny = tiny_outputs()
    codes = {"open_merged": None, **({"open_merged [baseline]": baseline} if baseline else {})}
    opened: dict[str, list] = {name: [] for name in codes}
    for repetition in range(repeat):
        for name in in_turn(codes, repetition):
            _, used, others, out = timed([sys.executable, "-c", OPEN_CHILD, str(tiny)], codes[name],
                                         output=True)
            opened[name].append((*map(float, out.split()), others, used))
    return opened


def _print(result: dict, repeat: int) -> None:
    med = statistics.median
    runs, cpu, load = result["seconds"], result["cpu_seconds"], result["others_cores"]
    print(f"check of {FILES} x {ROWS:,}-row files ({result['bytes'] / 1e9:.2f} GB), medians of {repeat}:")
    for name, times in runs.items():
        print(f"  {name:22} {med(times):.2f} s  ({', '.join(f'{t:.2f}' for t in times)}), "
              f"CPU {med(cpu[name]):.2f} s; others used {med(load[name]):.2f} cores")
    for name, ratios in result["over_cat"].items():
        print(f"  {name + ' / cat':22} {med(ratios):.2f}x  ({', '.join(f'{r:.2f}' for r in ratios)})"
              "  goal <= 2x")
    for name, runs_ in result["open_merged"].items():
        print(f"{name} of {TINY_FILES} files: {med(r[0] for r in runs_):.3f} s "
              f"({', '.join(f'{r[0]:.3f}' for r in runs_)}; including import dask_merge; "
              f"reading them whole: {med(r[1] for r in runs_):.3f} s); "
              f"CPU {med(r[3] for r in runs_):.2f} s; others used {med(r[2] for r in runs_):.2f} cores")


if __name__ == "__main__":
    main()
