#!/usr/bin/env python
"""VirNucPro v2: the fork's convert-then-merge path vs dask-merge straight from the HDF5.

    python benchmarks/h5_bench.py                      # 20 chunks of 10,000 rows (200,000 sequences)
    python benchmarks/h5_bench.py --chunks 4 --rows 2000 --repeat 1    # a quick look

The data set is made once with ``dask-merge sample --layout v2`` under
benchmarks/data/v2-CHUNKSxROWS/ (gitignored).  Each path runs as commands,
timed from start to exit, while a sampler sums the RSS of the whole process
tree (client plus workers) every 20 ms:

fork      ``python -c fork_convert(...)``: every id and vector of embeddings.h5
          into a dict of one tensor per sequence, ``torch.save`` of each
          chunk's STEM_ESM.pt (dask_merge.testing.fork_convert); then
          ``dask-merge run --protein-dir`` on 2 workers.
dask      ``dask-merge run --protein-h5 embeddings.h5`` on 2 workers.

Outputs of the two are compared byte for byte.  Each run also says where its
memory went: per process of the tree (the command, the pool's fork server,
its resource tracker, each worker) its RSS at the tree's peak and its own
peak, the CPU seconds of the tree, and the load average before and after.
``--only dask`` runs one path alone, for that breakdown; ``--baseline DIR``
also runs the dask path from another checkout, interleaved.  Results go to
benchmarks/results/h5-*.json.
"""

from __future__ import annotations

import argparse
import filecmp
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

HERE = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent


def role(proc: psutil.Process, root: psutil.Process) -> str:
    """What a process of the tree is: the command, the pool's fork server, a worker, ..."""
    if proc.pid == root.pid:
        return "client"
    try:
        line = " ".join(proc.cmdline())
        parent = proc.parent()
        parent_line = " ".join(parent.cmdline()) if parent is not None else ""
    except psutil.Error:
        return "other"
    if "resource_tracker" in line:
        return "resource tracker"
    if "forkserver" in parent_line:
        return "worker"
    if "forkserver" in line:
        return "fork server"
    return "other"


def tree_rss(root: psutil.Process, roles: dict[int, str], cpu: dict[int, float]) -> dict[int, int]:
    """RSS of each process of the tree, by pid; ``roles`` learns each new pid's role, ``cpu``
    the CPU seconds (user + system) each has used so far."""
    try:
        tree = [root, *root.children(recursive=True)]
    except psutil.Error:  # a process of the tree exited while it was being listed
        tree = [root]
    found = {}
    for proc in tree:
        try:
            found[proc.pid] = proc.memory_info().rss
            cpu[proc.pid] = sum(proc.cpu_times()[:2])
        except psutil.Error:  # exited between listing and reading
            continue
        if proc.pid not in roles:
            roles[proc.pid] = role(proc, root)
    return found


def timed(commands: list[list[str]], **popen) -> tuple[float, int, dict]:
    """Run ``commands`` one after another: wall seconds, the peak RSS of each tree, and where
    it went: per role (client, fork server, resource tracker, workers) the largest RSS a
    process of that role reached, and the split of the tree's total at its peak; and the CPU
    seconds of every process (as last sampled, up to 20 ms short of each one's end)."""
    peak, start, breakdown, cpu = 0, time.perf_counter(), {}, {}
    for command in commands:
        proc = psutil.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, **popen)
        done = threading.Event()
        roles: dict[int, str] = {}
        worst: dict[int, int] = {}
        at_peak: list = [0, {}]

        def sample(proc=proc, done=done, roles=roles, worst=worst, at_peak=at_peak) -> None:
            while not done.is_set():
                found = tree_rss(proc, roles, cpu)
                for pid, rss in found.items():
                    worst[pid] = max(worst.get(pid, 0), rss)
                if sum(found.values()) > at_peak[0]:
                    at_peak[:] = [sum(found.values()), found]
                time.sleep(0.02)

        sampler = threading.Thread(target=sample)
        sampler.start()
        _, err = proc.communicate()
        done.set()
        sampler.join()
        if proc.returncode:
            sys.exit(f"{command[:3]} failed:\n{err.decode()[-2000:]}")
        if at_peak[0] > peak:
            peak = at_peak[0]
            breakdown = {"command": " ".join(map(str, command[:2])),
                         "at_peak_mib": _by_role(at_peak[1], roles),
                         "process_peaks_mib": _by_role(worst, roles)}
    breakdown["cpu_s"] = round(sum(cpu.values()), 1)
    return time.perf_counter() - start, peak, breakdown


def _by_role(rss: dict[int, int], roles: dict[int, str]) -> dict[str, list[float]]:
    """MiB by role, one figure per process, in pid order."""
    out: dict[str, list[float]] = {}
    for pid in sorted(rss):
        out.setdefault(roles.get(pid, "other"), []).append(round(rss[pid] / 2**20, 1))
    return out


def make_data(folder: Path, chunks: int, rows: int) -> None:
    if (folder / "embeddings.h5").is_file():
        return
    subprocess.run([str(BIN / "dask-merge"), "sample", "--dir", str(folder), "--pairs", str(chunks),
                    "--rows", str(rows), "--layout", "v2"], check=True)


def fork(data: Path, out: Path, work: Path) -> list[list[str]]:
    esm = work / "esm"
    esm.mkdir(parents=True)
    convert = (
        "import sys; from pathlib import Path; from dask_merge.testing import fork_convert; "
        "data = Path(sys.argv[1]); stems = sorted(p.name[:-len('_DNABERT_S.pt')] "
        "for p in data.glob('*_DNABERT_S.pt')); "
        # The fork knows each chunk's protein ids from its FASTA; here, free of charge.
        "import h5py; ids = h5py.File(data / 'embeddings.h5')['sequence_ids'].asstr()[:]; "
        "chunk = {s: [] for s in stems}; "
        "[chunk[i.split('_seq_')[0].split('_orphan_')[0]].append(i) for i in ids]; "
        "fork_convert([data / 'embeddings.h5'], chunk, sys.argv[2])"
    )
    return [[sys.executable, "-c", convert, str(data), str(esm)],
            [str(BIN / "dask-merge"), "run", "--nucleotide-dir", str(data), "--protein-dir", str(esm),
             "--output-dir", str(out), "--workers", "2", "--no-progress"]]


def ours(data: Path, out: Path, work: Path) -> list[list[str]]:
    return [[str(BIN / "dask-merge"), "run", "--nucleotide-dir", str(data), "--protein-h5",
             str(data / "embeddings.h5"), "--output-dir", str(out), "--workers", "2", "--no-progress"]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--chunks", type=int, default=20)
    parser.add_argument("--rows", type=int, default=10_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--only", choices=["fork", "dask"],
                        help="Run one path alone: where its memory goes, no comparison.")
    parser.add_argument("--baseline", type=Path, metavar="DIR",
                        help="Also run the dask path from the checkout DIR (e.g. a `git archive "
                             "main`), interleaved: a change judged against its predecessor.")
    args = parser.parse_args()
    data = HERE / "data" / f"v2-{args.chunks}x{args.rows}"
    make_data(data, args.chunks, args.rows)
    paths = [("fork", fork, {}), ("dask", ours, {})]
    if args.baseline:
        # Its own checkout first on the path of the client and (through the
        # fork server's current folder) of the pool's workers.
        where = str(args.baseline.resolve())
        paths.append(("baseline", ours, {"cwd": where, "env": {**os.environ, "PYTHONPATH": where}}))
    results: dict[str, list[tuple[float, int, dict]]] = {name: [] for name, _, _ in paths}
    for i in range(args.repeat):
        # Alternating, side by side; the paths after the fork's take turns to
        # come first, and each starts with the writes before it flushed.
        for name, commands, popen in paths[:1] + paths[1:][::1 - 2 * (i % 2)]:
            if args.only not in (None, name):
                continue
            work = HERE / "data" / f"v2-run-{name}"
            shutil.rmtree(work, ignore_errors=True)
            os.sync()
            load = os.getloadavg()[0]
            results[name].append(timed(commands(data, work / "merged", work), **popen))
            seconds, peak, where = results[name][-1]
            where["load"] = [round(load, 1), round(os.getloadavg()[0], 1)]
            print(f"run {i + 1} {name}: {seconds:.1f} s, {where['cpu_s']} CPU s, "
                  f"{peak / 2**20:.0f} MiB peak, load "
                  f"{where['load'][0]} -> {where['load'][1]}; "
                  f"at the peak {where['at_peak_mib']}, "
                  f"each process's own peak {where['process_peaks_mib']}", flush=True)
    if args.only:
        return
    names = sorted(p.name for p in (HERE / "data" / "v2-run-fork" / "merged").glob("*_merged.pt"))
    same = names and all(filecmp.cmp(HERE / "data" / "v2-run-fork" / "merged" / n,
                                     HERE / "data" / "v2-run-dask" / "merged" / n, shallow=False)
                         for n in names)
    summary = {name: {"seconds": statistics.median(t for t, _, _ in runs),
                      "cpu_seconds": statistics.median(w["cpu_s"] for _, _, w in runs),
                      "peak_mib": statistics.median(m for _, m, _ in runs) / 2**20, "runs": runs}
               for name, runs in results.items()}
    summary["speedup"] = summary["fork"]["seconds"] / summary["dask"]["seconds"]
    summary["speedup_cpu"] = summary["fork"]["cpu_seconds"] / summary["dask"]["cpu_seconds"]
    if args.baseline:  # paired, run by run: dask over its baseline
        pairs = list(zip(results["dask"], results["baseline"]))
        summary["vs_baseline"] = {
            "wall": [round(d[0] / b[0], 2) for d, b in pairs],
            "cpu": [round(d[2]["cpu_s"] / b[2]["cpu_s"], 2) for d, b in pairs],
            "peak": [round(d[1] / b[1], 2) for d, b in pairs],
        }
    summary["memory_ratio"] = summary["dask"]["peak_mib"] / summary["fork"]["peak_mib"]
    summary["identical_outputs"] = bool(same) and len(names) == args.chunks
    summary["sequences"] = args.chunks * args.rows
    print(json.dumps({k: v for k, v in summary.items() if k not in results}, indent=1))
    print({k: {m: round(v, 1) for m, v in summary[k].items() if m != "runs"} for k in results})
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / f"h5-{time.strftime('%Y%m%d-%H%M%S')}.json").write_text(json.dumps(summary))


if __name__ == "__main__":
    main()
