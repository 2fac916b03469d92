#!/usr/bin/env python
"""Benchmarks of dask_merge (issue 7): a script, not a test.

    python benchmarks/bench.py                  # everything, 5 repetitions each
    python benchmarks/bench.py --quick          # 2 repetitions, smaller sets
    python benchmarks/bench.py --only kernel    # or scaling, overhead, mixed, rerun, machine
    python benchmarks/bench.py --only machine --baseline DIR   # merge_pair vs the checkout in DIR
    python benchmarks/bench.py --profile        # cProfile of merge_pair on the big pair
    python benchmarks/bench.py --pool FILE...    # paired ratios of results/*.json, pooled
    python benchmarks/bench.py --pool ... --plot ratios.png      # and a plot of them

Three parts, each variant run in a fresh subprocess (so its peak RSS is its
own) and repeated; medians are reported:

kernel    one realistic 10,000-row pair (768 + 2560 wide, shuffled protein ids):
          the upstream algorithm (torch.load, per-row torch.tensor / torch.cat,
          torch.stack, torch.save) vs dask_merge.merge_pair vs the I/O floor
          (read both inputs, torch.save a (10000, 3328) float32 tensor, fsync).
          Outputs are checked bit for bit (ids and torch.equal on data).
scaling   16 such pairs on the processes scheduler, 1 vs 2 workers.
mixed     200 tiny + 8 big pairs and 1,000 tiny + 40 big (hard links), the big ones
          first, last, spread or interleaved: the default partitioning vs fixed
          pairs per task (1 and --fixed), on processes with 2 workers.
rerun     dask_merge.run over 20,000 checkpointed pairs (hard links of one tiny
          pair): its time, and whether it started the pool's fork server or workers.
overhead  2,000 10-row pairs: sync vs processes vs a LocalCluster, with the
          engine's automatic partition size vs one task per pair; and the
          dask-merge command end to end (interpreter start to exit), sync vs
          processes.

Inputs are made once and cached under benchmarks/data/ (gitignored); the 16
scaling pairs are hard links of the one big pair, so they are read from the
page cache: the numbers are warm-cache, CPU-bound throughput.  Raw results go
to benchmarks/results/ (gitignored) as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

HERE = Path(__file__).resolve().parent
DATA = HERE / "data"
RESULTS = HERE / "results"

BIG_ROWS, BIG_NUC_ONLY, BIG_PROT_ONLY = 10_000, 20, 3
TINY_ROWS = 10
MERGED_WIDTH = 768 + 2560

GOALS = {
    "speedup": 10.0,  # merge_pair vs upstream, at least
    "floor": 1.5,  # merge_pair / I/O floor, at most
    "mixed": 1.15,  # default partitioning / the best fixed pairs per task, at most
    "rss": 0.5,  # peak RSS merge_pair / upstream, at most
    "scaling": 1.7,  # 2 workers / 1 worker throughput, at least
    "overhead": 1.5,  # processes (2 workers) / sync throughput on tiny pairs, at least
    "overhead, command": 1.5,  # the same, the dask-merge command timed from start to exit
}


# --- data ----------------------------------------------------------------------


def _log(*args) -> None:
    print(*args, file=sys.stderr, flush=True)


def _complete(folder: Path, spec: dict) -> bool:
    marker = folder / ".complete.json"
    try:
        return json.loads(marker.read_text()) == spec
    except (OSError, ValueError):
        return False


def _mark(folder: Path, spec: dict) -> None:
    (folder / ".complete.json").write_text(json.dumps(spec))


def big_pair() -> tuple[str, str]:
    """The realistic pair (made once, ~180 MB): paths of its DNABERT-S and ESM files."""
    folder = DATA / "big"
    spec = {"rows": BIG_ROWS, "nucleotide_only": BIG_NUC_ONLY, "protein_only": BIG_PROT_ONLY}
    if not _complete(folder, spec):
        from dask_merge.testing import make_pair

        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        _log(f"making the {BIG_ROWS}-row pair in {folder} (once) ...")
        start = time.perf_counter()
        make_pair(folder, "big", rows=BIG_ROWS, nucleotide_only=BIG_NUC_ONLY,
                  protein_only=BIG_PROT_ONLY)
        _log(f"  done in {time.perf_counter() - start:.0f} s")
        _mark(folder, spec)
    return str(folder / "big_DNABERT_S.pt"), str(folder / "big_ESM.pt")


def scaling_set(pairs: int) -> Path:
    """A folder of ``pairs`` copies (hard links) of the big pair, stems chunk_0 ..."""
    nucleotide, protein = big_pair()
    folder = DATA / f"scaling-{pairs}" / "in"
    spec = {"pairs": pairs, "source": os.stat(nucleotide).st_mtime_ns}
    if not _complete(folder, spec):
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        for i in range(pairs):
            for source, suffix in ((nucleotide, "_DNABERT_S.pt"), (protein, "_ESM.pt")):
                target = folder / f"chunk_{i}{suffix}"
                try:
                    os.link(source, target)
                except OSError:
                    shutil.copyfile(source, target)
        _mark(folder, spec)
    return folder


def tiny_set(pairs: int) -> Path:
    """A folder of ``pairs`` 10-row pairs at the real widths."""
    folder = DATA / f"tiny-{pairs}" / "in"
    spec = {"pairs": pairs, "rows": TINY_ROWS}
    if not _complete(folder, spec):
        from dask_merge.testing import make_pair

        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        _log(f"making {pairs} tiny pairs in {folder} (once) ...")
        start = time.perf_counter()
        for i in range(pairs):
            make_pair(folder, f"tiny_{i}", rows=TINY_ROWS, nucleotide_only=1, protein_only=1, seed=i)
        _log(f"  done in {time.perf_counter() - start:.0f} s")
        _mark(folder, spec)
    return folder


ORDERS = ("big first", "big last", "spread", "interleaved")


def mixed_order(tiny: int, big: int, order: str) -> list[bool]:
    """Which positions of the plan hold a big pair (True), for ``order``.

    >>> mixed_order(4, 2, "spread"), mixed_order(4, 2, "interleaved")
    ([True, False, False, True, False, False], [True, False, True, False, False, False])
    """
    if order in ("big first", "big last"):
        first = [True] * big if order == "big first" else [False] * tiny
        return first + ([False] * tiny if order == "big first" else [True] * big)
    if order == "spread":
        places = {k * (tiny + big) // big for k in range(big)}
        return [i in places for i in range(tiny + big)]
    return [s for _ in range(big) for s in (True, False)] + [False] * (tiny - big)


def mixed_set(tiny: int, big: int, order: str) -> Path:
    """``tiny`` 10-row pairs and ``big`` 10,000-row pairs, all hard links, placed as ``order`` says.

    Stems ``p_0`` ... sort in plan order, so the big pairs sit where ``order`` puts them.
    """
    nucleotide, protein = big_pair()
    small = tiny_set(tiny)
    folder = DATA / f"mixed-{tiny}-{big}-{order.replace(' ', '-')}" / "in"
    spec = {"tiny": tiny, "big": big, "order": order, "source": os.stat(nucleotide).st_mtime_ns}
    if not _complete(folder, spec):
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        tiny_left = iter(range(tiny))
        suffixes = ("_DNABERT_S.pt", "_ESM.pt")
        for i, is_big in enumerate(mixed_order(tiny, big, order)):
            k = None if is_big else next(tiny_left)
            sources = (nucleotide, protein) if is_big else [small / f"tiny_{k}{s}" for s in suffixes]
            for source, suffix in zip(sources, suffixes):
                os.link(source, folder / f"p_{i}{suffix}")
        _mark(folder, spec)
    return folder


def checkpointed_set(pairs: int) -> Path:
    """``pairs`` hard links of one tiny pair, all merged and checkpointed (once)."""
    source = tiny_set(1)
    folder = DATA / f"checkpointed-{pairs}" / "in"
    spec = {"pairs": pairs}
    if not _complete(folder, spec):
        import dask_merge

        shutil.rmtree(folder.parent, ignore_errors=True)
        folder.mkdir(parents=True)
        for i in range(pairs):
            for suffix in ("_DNABERT_S.pt", "_ESM.pt"):
                os.link(source / f"tiny_0{suffix}", folder / f"c_{i}{suffix}")
        _log(f"merging {pairs} tiny pairs in {folder.parent / 'out'} (once) ...")
        report = dask_merge.run(folder, output_dir=folder.parent / "out", progress=False)
        if report.counts["merged"] != pairs:
            raise SystemExit(f"could not make the checkpointed set: {report.summary()}")
        _mark(folder, spec)
    return folder


# --- the variants, each run in a child process -----------------------------------------


def _rss_mb() -> float:
    """Current RSS of this process, MiB."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_mb() -> float:
    """Peak RSS of this process, MiB: VmHWM, which starts afresh at exec.

    Not getrusage's ru_maxrss: Linux carries the parent's peak over a
    vfork + exec (subprocess), so a child would report its parent's peak.
    """
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024


def _children_peak_mb() -> float:
    """Largest peak RSS of the waited-for children (ru_maxrss, so at least ours at their exec)."""
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # Linux: KiB


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def child_upstream(nucleotide: str, protein: str, output: str) -> dict:
    """VirNucPro's merge_data, re-implemented (ids fixed to the rows kept, no warnings printed)."""
    import torch

    baseline = _rss_mb()
    cpu, start = _cpu(), time.perf_counter()
    nucleotide_file = torch.load(nucleotide)  # torch >= 2.6: weights_only=True by default
    protein_file = torch.load(protein)
    nucleotide_vectors = {}
    protein_vectors = {}
    for seq_id, row in zip(nucleotide_file["nucleotide"], nucleotide_file["data"]):
        nucleotide_vectors[seq_id] = torch.tensor(row["mean_representation"])
    for seq_id, vector in zip(protein_file["proteins"], protein_file["data"]):
        protein_vectors[seq_id] = vector
    rows, ids = [], []
    for seq_id in nucleotide_file["nucleotide"]:
        if seq_id in protein_vectors:
            rows.append(torch.cat((nucleotide_vectors[seq_id], protein_vectors[seq_id]), dim=-1))
            ids.append(seq_id)  # upstream saves all nucleotide ids (its bug); fixed here
    data = torch.stack(rows)
    torch.save({"ids": ids, "data": data}, output)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "cpu": _cpu() - cpu, "baseline_mb": baseline, "peak_mb": _peak_mb()}


def child_merge(nucleotide: str, protein: str, output: str) -> dict:
    from dask_merge import merge_pair

    baseline = _rss_mb()
    cpu, start = _cpu(), time.perf_counter()
    result = merge_pair(nucleotide, protein, output)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "cpu": _cpu() - cpu, "baseline_mb": baseline, "peak_mb": _peak_mb(), "rows": result.rows}


def child_floor(nucleotide: str, protein: str, output: str) -> dict:
    """Read both inputs' bytes, torch.save the merged-size tensor, fsync (timed apart)."""
    import torch

    data = torch.empty((BIG_ROWS, MERGED_WIDTH), dtype=torch.float32).fill_(0.5)
    baseline = _rss_mb()
    cpu, start = _cpu(), time.perf_counter()
    with open(nucleotide, "rb") as f:
        a = f.read()
    with open(protein, "rb") as f:
        b = f.read()
    read = time.perf_counter()
    with open(output, "wb") as f:
        torch.save(data, f)
        f.flush()
        written = time.perf_counter()
        os.fsync(f.fileno())
    synced = time.perf_counter()
    del a, b
    return {
        "seconds": synced - start,  # the floor: read + save + fsync
        "cpu": _cpu() - cpu,
        "read": read - start, "save": written - read, "fsync": synced - written,
        "no_fsync": written - start,
        "baseline_mb": baseline, "peak_mb": _peak_mb(),
    }


def _tasks(pending: list, partition_size: int | None, workers: int) -> int:
    """How many tasks the engine cuts ``pending`` into (where this checkout keeps the cut)."""
    try:
        from dask_merge.executors import _partitions
    except ImportError:  # a checkout from before the executors package, run as a baseline
        from dask_merge.engine import _partitions
    return len(_partitions(pending, partition_size, workers))


def child_engine(folder: str, output: str, scheduler: str, workers: int,
                 partition_size: int | None, warm: bool = False) -> dict:
    import dataclasses

    import dask_merge

    planned = dask_merge.plan(folder, output_dir=output, force=True)
    if warm:  # as a second run in a notebook: the pool's fork server is up
        warm_up = dataclasses.replace(planned, pending=planned.pending[:workers])
        warm_up.execute(scheduler, workers=workers, progress=False)
    tasks = _tasks(planned.pending, partition_size, workers)
    report = planned.execute(scheduler, workers=workers, progress=False,
                             partition_size=partition_size, dashboard_address="127.0.0.1:0")
    if not report.ok or report.counts["merged"] != len(planned.pending):
        raise SystemExit(f"run failed: {report.summary()}")
    if scheduler == "processes":
        # Reap the fork server (and with it its workers): else it outlives this
        # process and the workers' CPU time is not counted as this variant's.
        from multiprocessing import forkserver

        forkserver._forkserver._stop()
    return {"seconds": report.seconds, "pairs": len(planned.pending), "tasks": tasks,
            "peak_mb": _peak_mb(), "children_peak_mb": _children_peak_mb()}


def child_command(folder: str, output: str, scheduler: str, workers: int) -> dict:
    """``dask-merge run`` as a batch script runs it: timed from its start to its exit."""
    import dask_merge

    pairs = dask_merge.find_pairs(folder, output_dir=output).pairs
    command = [sys.executable, "-m", "dask_merge", "run", "--nucleotide-dir", folder,
               "--output-dir", output, "--scheduler", scheduler, "--workers", str(workers),
               "--force", "--no-progress"]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - start
    if done.returncode:
        raise SystemExit(f"dask-merge run failed:\n{done.stderr[-3000:]}")
    return {"seconds": seconds, "pairs": len(pairs),
            "tasks": _tasks(pairs, None, workers)}


def child_rerun(folder: str, output: str) -> dict:
    """``dask_merge.run`` over a fully checkpointed set: what a rerun with nothing to do costs."""
    import multiprocessing
    from multiprocessing import forkserver

    import dask_merge

    start = time.perf_counter()
    report = dask_merge.run(folder, output_dir=output, progress=False)
    seconds = time.perf_counter() - start
    if report.counts["skipped"] != len(report.records) or not report.ok:
        raise SystemExit(f"not a no-op rerun: {report.summary()}")
    server = getattr(forkserver._forkserver, "_forkserver_pid", None)
    return {"seconds": seconds, "pairs": len(report.records), "tasks": 0,
            "fork_server_started": server is not None,
            "workers_started": len(multiprocessing.active_children()), "peak_mb": _peak_mb()}


def child_load(nucleotide: str, protein: str, machine: str) -> dict:
    """Unpickle both files of the pair with the hand-written machine or a stdlib one."""
    from dask_merge.torchfile import TorchArchive

    baseline = _rss_mb()
    cpu, start = _cpu(), time.perf_counter()
    archives = [TorchArchive.open(path) for path in (nucleotide, protein)]
    loaded = [a.load() if machine == "hand" else _stdlib_load(a) for a in archives]
    seconds = time.perf_counter() - start
    del loaded
    return {"seconds": seconds, "cpu": _cpu() - cpu, "baseline_mb": baseline, "peak_mb": _peak_mb()}


def _stdlib_load(archive) -> object:
    """data.pkl through CPython's pickle.Unpickler, behind an allow-list: no torch, nothing else run.

    What the hand-written machine is measured against: the same tensor
    references, but every pickled float becomes a Python float.
    """
    import io
    import pickle

    from dask_merge.torchfile import STORAGE_DTYPES, TensorRef

    def rebuild(storage, offset, shape, stride, requires_grad, hooks, metadata=None):
        return TensorRef(storage, offset, tuple(shape), tuple(stride))

    class AllowList(pickle.Unpickler):
        def find_class(self, module: str, name: str) -> object:
            if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
                return rebuild
            if (module, name) == ("collections", "OrderedDict"):
                return dict
            if module == "torch" and name in STORAGE_DTYPES:
                return STORAGE_DTYPES[name]
            raise pickle.UnpicklingError(f"{module}.{name} is not allowed")

        def persistent_load(self, pid: tuple) -> object:
            _, dtype, key, _, numel = pid
            return archive.storage_ref(key, dtype, numel)

    start, size = archive.pickle_offset, archive.pickle_size
    return AllowList(io.BytesIO(archive.buffer[start : start + size])).load()


CHILDREN = {"upstream": child_upstream, "merge": child_merge, "floor": child_floor,
            "engine": child_engine, "command": child_command,
            "rerun": child_rerun, "load": child_load}


def _busy_seconds() -> float:
    """CPU seconds the whole machine has been busy (all cores), from /proc/stat."""
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle, iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _our_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_child(kind: str, *args, timeout: float = 3600, code: str | None = None) -> dict:
    """Run one variant in a fresh interpreter; return what it measured.

    Also how busy the rest of the machine was meanwhile (``others_cores``:
    CPU used by processes that are not this variant, in cores): timings
    taken beside a busy neighbour are not worth much.
    """
    command = [sys.executable, os.path.abspath(__file__), "--child", json.dumps([kind, *args])]
    busy, ours, start = _busy_seconds(), _our_cpu_seconds(), time.perf_counter()
    # ``code``: a checkout whose dask_merge the child imports instead (a baseline),
    # run from there: an older checkout's fork server imports from its working folder.
    env = {**os.environ, "PYTHONPATH": code} if code else None
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env, cwd=code)
    wall = time.perf_counter() - start
    if done.returncode:
        raise RuntimeError(f"{kind} {args} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    ours = _our_cpu_seconds() - ours
    result["cpu_total"] = ours  # the variant's process tree, start-up included
    result["others_cores"] = max(0.0, (_busy_seconds() - busy - ours) / wall)
    return result


def in_turn(variants: list, repetition: int) -> list:
    """The variants in the order of this repetition: forwards, then backwards.

    What runs first after a pause (or after another part) is often slower,
    and drift is about linear in time: alternating the order spreads both
    over every variant alike.

    >>> in_turn(["a", "b", "c"], 0), in_turn(["a", "b", "c"], 1)
    (['a', 'b', 'c'], ['c', 'b', 'a'])
    """
    return list(variants) if repetition % 2 == 0 else list(variants)[::-1]


# --- the parts -----------------------------------------------------------------------


def median(runs: list[dict], key: str = "seconds") -> float:
    return statistics.median(r[key] for r in runs)


def spread(runs: list[dict], key: str = "seconds") -> str:
    values = [r[key] for r in runs]
    return f"{min(values):.3f}-{max(values):.3f}"


def bench_kernel(repeat: int) -> dict:
    nucleotide, protein = big_pair()
    out = DATA / "kernel-out"
    out.mkdir(exist_ok=True)
    outputs = {"upstream": str(out / "upstream_merged.pt"), "merge": str(out / "big_merged.pt"),
               "floor": str(out / "floor.pt")}
    runs: dict[str, list[dict]] = {k: [] for k in outputs}
    for i in range(repeat):  # interleaved, so drift hits every variant alike
        for kind, output in in_turn(outputs.items(), i):
            runs[kind].append(run_child(kind, nucleotide, protein, output))
            r = runs[kind][-1]
            _log(f"kernel {i + 1}/{repeat} {kind:8s} {r['seconds']:7.3f} s  cpu {r['cpu']:7.3f} s  "
                 f"peak {r['peak_mb']:6.0f} MiB  (others used {r['others_cores']:.1f} cores)")
    return {"runs": runs, "identical": verify(outputs["upstream"], outputs["merge"]),
            "sizes_mb": {"nucleotide": os.path.getsize(nucleotide) / 2**20,
                         "protein": os.path.getsize(protein) / 2**20,
                         "merged": os.path.getsize(outputs["merge"]) / 2**20}}


def bench_machine(repeat: int, baseline: str | None) -> dict:
    """The hand-written unpickler vs a stdlib allow-list one; merge_pair here vs a baseline checkout."""
    nucleotide, protein = big_pair()
    out = DATA / "kernel-out"
    out.mkdir(exist_ok=True)
    variants = {"hand": ("load", nucleotide, protein, "hand"), "stdlib": ("load", nucleotide, protein, "stdlib"),
                "merge": ("merge", nucleotide, protein, str(out / "new_merged.pt"))}
    if baseline:
        variants["merge_baseline"] = ("merge", nucleotide, protein, str(out / "baseline_merged.pt"))
    runs: dict[str, list[dict]] = {k: [] for k in variants}
    for i in range(repeat):
        for name, (kind, *args) in in_turn(variants.items(), i):
            runs[name].append(run_child(kind, *args, code=baseline if name == "merge_baseline" else None))
            r = runs[name][-1]
            _log(f"machine {i + 1}/{repeat} {name:15s} {r['seconds']:7.3f} s  peak {r['peak_mb']:6.0f} MiB  "
                 f"(others used {r['others_cores']:.1f} cores)")
    return {"runs": runs}


def verify(upstream: str, merged: str) -> dict:
    import torch

    a = torch.load(upstream, weights_only=True)
    b = torch.load(merged, weights_only=True)
    return {
        "ids": a["ids"] == b["ids"],
        "data": bool(a["data"].dtype == b["data"].dtype and a["data"].shape == b["data"].shape
                     and torch.equal(a["data"], b["data"])),
        "rows": len(b["ids"]), "shape": list(b["data"].shape),
    }


RAM_OUT = Path("/dev/shm/dask_merge_bench")  # outputs on tmpfs: no disk flushes at all


class Variant(NamedTuple):
    """One way to run the engine over a data set."""

    label: str
    scheduler: str
    workers: int
    partition_size: int | None = None  # None: the engine's own
    warm: bool = False  # a second run in one interpreter: the fork server is up
    command: bool = False  # the dask-merge command, from start to exit
    code: str | None = None  # a checkout whose dask_merge runs it (a baseline)


def bench_engine(name: str, folder: Path, variants: list[Variant], repeat: int, *,
                 in_ram: tuple[str, ...] = (), out: Path | None = None,
                 baseline: str | None = None) -> dict:
    """Run each variant ``repeat`` times, its outputs in ``out`` (default: beside the inputs).

    The variants labelled in ``in_ram`` run once more with their outputs on
    tmpfs, as "LABEL, outputs in RAM": no disk flush to share.  With a
    ``baseline`` checkout, every variant also runs from it, interleaved, as
    "LABEL [baseline]".
    """
    plan = [(v, out or folder.parent / "out") for v in variants]
    plan += [(v._replace(label=f"{v.label}, outputs in RAM"), RAM_OUT)
             for v in variants if v.label in in_ram and RAM_OUT.parent.is_dir()]
    if baseline:
        plan += [(v._replace(label=f"{v.label} [baseline]", code=baseline), where)
                 for v, where in plan]
    runs: dict[str, list[dict]] = {}
    try:
        for i in range(repeat):
            for v, where in in_turn(plan, i):
                where.mkdir(parents=True, exist_ok=True)
                if v.command:
                    result = run_child("command", str(folder), str(where), v.scheduler, v.workers,
                                       code=v.code)
                else:
                    result = run_child("engine", str(folder), str(where), v.scheduler, v.workers,
                                       v.partition_size, v.warm, code=v.code)
                runs.setdefault(v.label, []).append(result)
                _log(f"{name} {i + 1}/{repeat} {v.label:24s} {result['seconds']:7.3f} s  "
                     f"({result['pairs']} pairs, {result['tasks']} tasks; "
                     f"others used {result['others_cores']:.1f} cores)")
    finally:
        shutil.rmtree(RAM_OUT, ignore_errors=True)
    return runs


def bench_scaling(repeat: int, pairs: int, baseline: str | None = None) -> dict:
    folder = scaling_set(pairs)
    variants = [Variant("processes, 1 worker", "processes", 1),
                Variant("processes, 2 workers", "processes", 2)]
    # In RAM too: 16 big pairs write 2 GB of fsynced outputs.
    runs = bench_engine("scaling", folder, variants, repeat,
                        in_ram=tuple(v.label for v in variants), baseline=baseline)
    return {"pairs": pairs, "runs": runs}


def bench_overhead(repeat: int, pairs: int, baseline: str | None = None) -> dict:
    folder = tiny_set(pairs)
    variants = [
        Variant("sync", "sync", 1),
        Variant("processes, 2w, auto", "processes", 2),
        Variant("processes, 2w, 1/task", "processes", 2, partition_size=1),
        Variant("processes, 2w, auto, warm", "processes", 2, warm=True),
        Variant("local, 2w, auto", "local", 2),
        Variant("local, 2w, 1/task", "local", 2, partition_size=1),
        Variant("command: sync", "sync", 1, command=True),
        Variant("command: processes, 2w", "processes", 2, command=True),
    ]
    # In RAM too: what is the scheduler's cost, and what the disk's?
    runs = bench_engine("overhead", folder, variants, repeat,
                        in_ram=("sync", "processes, 2w, auto", "processes, 2w, auto, warm",
                                "command: sync", "command: processes, 2w"), baseline=baseline)
    return {"pairs": pairs, "runs": runs}


def bench_mixed(repeat: int, sets: list[tuple[int, int]], fixed: list[int]) -> dict:
    """Tiny and big pairs mixed, in each order: the default cut vs fixed pairs per task.

    Outputs go to tmpfs (see :data:`RAM_OUT`).
    """
    variants = [Variant("auto", "processes", 2), Variant("1/task", "processes", 2, partition_size=1)]
    variants += [Variant(f"{n}/task", "processes", 2, partition_size=n) for n in fixed]
    found = {}
    for tiny, big in sets:
        for order in ORDERS:
            name = f"{tiny} tiny + {big} big, {order}"
            # Outputs on tmpfs: 40 big outputs are 5 GB, which this VM's rate-limited
            # disk takes minutes to flush, whatever the tasks; the cut is what is measured.
            found[name] = bench_engine(f"mixed {name}", mixed_set(tiny, big, order), variants,
                                       repeat, out=RAM_OUT)
    return {"runs": found}


def bench_rerun(repeat: int, pairs: int) -> dict:
    folder = checkpointed_set(pairs)
    runs = []
    for i in range(repeat):
        runs.append(run_child("rerun", str(folder), str(folder.parent / "out")))
        r = runs[-1]
        _log(f"rerun {i + 1}/{repeat} {r['seconds']:7.3f} s ({r['pairs']} pairs; fork server "
             f"started: {r['fork_server_started']}, worker processes: {r['workers_started']})")
    return {"pairs": pairs, "runs": runs}


# --- reporting -----------------------------------------------------------------------


def machine() -> dict:
    import dask
    import distributed
    import numpy

    info = {"nproc": len(os.sched_getaffinity(0)), "python": platform.python_version(),
            "dask": dask.__version__, "distributed": distributed.__version__,
            "numpy": numpy.__version__, "kernel": platform.release()}
    try:
        import torch

        info["torch"] = torch.__version__
    except ImportError:
        info["torch"] = "-"
    with open("/proc/cpuinfo") as f:
        models = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    info["cpu"] = models[0] if models else platform.processor()
    with open("/proc/meminfo") as f:
        total = next(int(line.split()[1]) for line in f if line.startswith("MemTotal"))
    info["ram_gib"] = round(total / 2**20, 1)
    try:
        info["commit"] = subprocess.run(
            ["git", "describe", "--always", "--dirty"], cwd=HERE, capture_output=True, text=True
        ).stdout.strip()
    except OSError:
        info["commit"] = "?"
    return info


def _goal(met: bool) -> str:
    return "met" if met else "**NOT met**"


def report(results: dict) -> str:
    m = results["machine"]
    lines = [
        f"Machine: {m['nproc']} cores ({m['cpu']}), {m['ram_gib']} GiB RAM; Linux {m['kernel']}; "
        f"Python {m['python']}, torch {m['torch']}, dask {m['dask']}, distributed "
        f"{m['distributed']}, numpy {m['numpy']}; dask_merge {m['commit']}. "
        f"{results['repeat']} repetitions, each in a fresh process: medians (min-max). "
        "'others' = CPU cores that other processes on the machine used meanwhile (median).",
        "",
        "| benchmark | variant | seconds | CPU s | peak RSS MiB | result | goal |",
        "| --- | --- | ---: | ---: | ---: | --- | --- |",
    ]

    def others(runs: dict) -> str:
        return f"others {median([r for v in runs.values() for r in v], 'others_cores'):.1f} cores"

    kernel = results.get("kernel")
    if kernel:
        runs = kernel["runs"]
        up, mp, fl = (median(runs[k]) for k in ("upstream", "merge", "floor"))
        cpu = {k: median(runs[k], "cpu") for k in runs}
        no_sync = median(runs["floor"], "no_fsync")
        peak = {k: median(runs[k], "peak_mb") for k in runs}
        above = {k: peak[k] - median(runs[k], "baseline_mb") for k in runs}
        sizes = kernel["sizes_mb"]
        same = kernel["identical"]
        lines += [
            f"| kernel: 10,000-row pair ({sizes['nucleotide']:.0f} + {sizes['protein']:.0f} MB "
            f"-> {sizes['merged']:.0f} MB); {others(runs)} | upstream (torch.load, per-row "
            f"tensor + cat, stack, torch.save) | {up:.2f} ({spread(runs['upstream'])}) | "
            f"{cpu['upstream']:.2f} | {peak['upstream']:.0f} ({above['upstream']:.0f} above imports) | | |",
            f"| | dask_merge.merge_pair | {mp:.3f} ({spread(runs['merge'])}) | {cpu['merge']:.3f} | "
            f"{peak['merge']:.0f} ({above['merge']:.0f} above imports) | **{up / mp:.1f}x** faster "
            f"than upstream (CPU {cpu['upstream'] / cpu['merge']:.1f}x) | >= {GOALS['speedup']:g}x: "
            f"{_goal(up / mp >= GOALS['speedup'])} |",
            f"| | I/O floor: read inputs + torch.save + fsync | {fl:.3f} ({spread(runs['floor'])}) | "
            f"{cpu['floor']:.3f} | {peak['floor']:.0f} | merge_pair / floor **{mp / fl:.2f}x** "
            f"(without fsync {mp / no_sync:.2f}x) | <= {GOALS['floor']:g}x: "
            f"{_goal(mp / fl <= GOALS['floor'])} |",
            f"| | floor parts: read / torch.save / fsync | {median(runs['floor'], 'read'):.3f} / "
            f"{median(runs['floor'], 'save'):.3f} / {median(runs['floor'], 'fsync'):.3f} | | | | |",
            f"| | peak RSS merge_pair / upstream | | | | **{peak['merge'] / peak['upstream']:.2f}x** "
            f"(above imports {above['merge'] / above['upstream']:.2f}x) | <= {GOALS['rss']:g}x: "
            f"{_goal(peak['merge'] / peak['upstream'] <= GOALS['rss'])} |",
            f"| | outputs bit-identical (ids, torch.equal) | | | | ids {same['ids']}, data "
            f"{same['data']}, shape {tuple(same['shape'])} | {_goal(same['ids'] and same['data'])} |",
        ]
    scaling = results.get("scaling")
    if scaling:
        runs, pairs = scaling["runs"], scaling["pairs"]
        for where in ("", ", outputs in RAM"):
            if f"processes, 1 worker{where}" not in runs:
                continue
            one, two = runs[f"processes, 1 worker{where}"], runs[f"processes, 2 workers{where}"]
            t1, t2 = median(one), median(two)
            what = f"scaling: {pairs} big pairs, processes; {others(runs)}" if not where else ""
            goal = f">= {GOALS['scaling']:g}x: {_goal(t1 / t2 >= GOALS['scaling'])}" if not where else ""
            lines += [
                f"| {what} | 1 worker{where} | {t1:.2f} ({spread(one)}) | "
                f"{median(one, 'cpu_total'):.1f} | {median(one, 'children_peak_mb'):.0f} per worker | "
                f"{pairs / t1:.2f} pairs/s | |",
                f"| | 2 workers{where} | {t2:.2f} ({spread(two)}) | {median(two, 'cpu_total'):.1f} | "
                f"{median(two, 'children_peak_mb'):.0f} per worker | {pairs / t2:.2f} pairs/s, "
                f"**{t1 / t2:.2f}x** | {goal} |",
            ]
    overhead = results.get("overhead")
    if overhead:
        runs, pairs = overhead["runs"], overhead["pairs"]
        first = True
        for label, r in runs.items():
            t = median(r)
            note = f"{pairs / t:.0f} pairs/s, {1000 * t / pairs:.2f} ms/pair, {r[0]['tasks']} tasks"
            goal = ""
            command = label.startswith("command: ")
            baseline = ("command: sync" if command else "sync") + (
                ", outputs in RAM" if label.endswith(", outputs in RAM") else "")
            if label != baseline:
                note += f", **{median(runs[baseline]) / t:.2f}x** {baseline}"
            for name, (_, base, variant) in PAIRED.items():
                if label == variant:
                    ratio = median(runs[base]) / t
                    goal = f">= {GOALS[name]:g}x: {_goal(ratio >= GOALS[name])}"
            what = f"overhead: {pairs} tiny pairs (10 rows); {others(runs)}" if first else ""
            first = False
            # The command's pool outlives it by a moment: its CPU is not all counted.
            cpu = "" if command else f"{median(r, 'cpu_total'):.1f}"
            lines.append(f"| {what} | {label} | {t:.2f} ({spread(r)}) | {cpu} | | {note} | {goal} |")
        for scheduler in ("processes", "local"):
            auto, single = runs[f"{scheduler}, 2w, auto"], runs[f"{scheduler}, 2w, 1/task"]
            extra = single[0]["tasks"] - auto[0]["tasks"]
            if extra > 0:
                per_task = 1000 * (median(single) - median(auto)) / extra
                cpu_task = 1000 * (median(single, "cpu_total") - median(auto, "cpu_total")) / extra
                lines.append(
                    f"| | {scheduler}: partition_size=1 vs auto | | | | "
                    f"{per_task:.2f} ms wall, {cpu_task:.2f} CPU-ms per extra task | |"
                )
    lines += _mixed_lines(results.get("mixed"), others) + _rerun_lines(results.get("rerun"))
    return "\n".join(lines)


def _mixed_lines(mixed: dict | None, others) -> list[str]:
    """One row per data set and order: the default cut against the best fixed one."""
    lines = []
    for name, runs in (mixed or {}).get("runs", {}).items():
        auto = median(runs["auto"])
        fixed = {label: median(r) for label, r in runs.items() if label != "auto"}
        best = min(fixed, key=fixed.get)
        ratio = auto / fixed[best]
        shown = ", ".join(f"{label} {t:.2f} s ({runs[label][0]['tasks']} tasks)"
                          for label, t in fixed.items())
        lines.append(
            f"| mixed: {name}, processes 2w; {others(runs)} | default ({runs['auto'][0]['tasks']} "
            f"tasks) vs {shown} | {auto:.2f} ({spread(runs['auto'])}) | "
            f"{median(runs['auto'], 'cpu_total'):.1f} | | default / best fixed ({best}) "
            f"**{ratio:.2f}x** | <= {GOALS['mixed']:g}x: {_goal(ratio <= GOALS['mixed'])} |")
    return lines


def _rerun_lines(rerun: dict | None) -> list[str]:
    if not rerun:
        return []
    runs = rerun["runs"]
    started = sum(r["fork_server_started"] for r in runs)
    workers = max(r["workers_started"] for r in runs)
    return [f"| no-op rerun: {rerun['pairs']} checkpointed pairs, dask_merge.run on processes | | "
            f"{median(runs):.2f} ({spread(runs)}) | {median(runs, 'cpu_total'):.2f} | "
            f"{median(runs, 'peak_mb'):.0f} | fork server started in {started} of {len(runs)} "
            f"runs; worker processes alive at the end: {workers} | no worker process: "
            f"{_goal(not started and not workers)} |"]


# Goals that compare two engine variants: (part, baseline, variant).  Their
# repetitions ran back to back, so each repetition gives a ratio of its own.
PAIRED = {
    "scaling": ("scaling", "processes, 1 worker", "processes, 2 workers"),
    "overhead": ("overhead", "sync", "processes, 2w, auto"),
    "overhead, command": ("overhead", "command: sync", "command: processes, 2w"),
}


def paired_ratios(baseline: list[dict], variant: list[dict]) -> list[float]:
    """Throughput of ``variant`` over ``baseline``, repetition by repetition.

    >>> paired_ratios([{"seconds": 4.0}, {"seconds": 6.0}], [{"seconds": 2.0}, {"seconds": 4.0}])
    [2.0, 1.5]
    """
    return [b["seconds"] / v["seconds"] for b, v in zip(baseline, variant)]


def pooled(files: list[Path]) -> tuple[dict[str, list[list[float]]], set[str]]:
    """The paired ratios of several runs' results: per goal, one list per run.

    On a noisy machine one run's median flips around a goal from run to run;
    the ratios of many back-to-back repetitions, pooled over runs of code
    that is the same in what they measure, tell where it really lies.
    """
    ratios: dict[str, list[list[float]]] = {}
    commits = set()
    for file in files:
        results = json.loads(file.read_text())
        commits.add(results["machine"]["commit"])
        for goal, (part, baseline, variant) in PAIRED.items():
            found = results.get(part, {}).get("runs", {})
            if baseline in found and variant in found:
                ratios.setdefault(goal, []).append(paired_ratios(found[baseline], found[variant]))
    return ratios, commits


def pooled_report(ratios: dict[str, list[list[float]]], commits: set[str], files: int) -> str:
    lines = [f"{files} result files, dask_merge {', '.join(sorted(commits))}"]
    for goal, runs in ratios.items():
        values = sorted(v for run in runs for v in run)
        middle = statistics.median(values)
        low, _, high = statistics.quantiles(values, n=4) if len(values) > 1 else values * 3
        met = sum(v >= GOALS[goal] for v in values)
        lines.append(
            f"{goal}: {len(values)} paired repetitions in {len(runs)} runs: median "
            f"{middle:.2f}x (quartiles {low:.2f}-{high:.2f}, min-max {values[0]:.2f}-"
            f"{values[-1]:.2f}); {met} of {len(values)} >= {GOALS[goal]:g}x; "
            f"goal on the median: {_goal(middle >= GOALS[goal])}"
        )
    return "\n".join(lines)


TITLES = {"scaling": "16 big pairs: 2 workers / 1 worker",
          "overhead": "2,000 tiny pairs: processes (2 workers) / sync",
          "overhead, command": "the same, dask-merge run from start to exit"}


def plot_pooled(ratios: dict[str, list[list[float]]], path: Path) -> None:
    """Each repetition's ratio as a dot, a column per run, against the goal's line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(ratios), figsize=(5.5 * len(ratios), 3.6), squeeze=False)
    for ax, (goal, runs) in zip(axes[0], ratios.items()):
        for i, run in enumerate(runs):
            ax.plot([i] * len(run), run, "o", alpha=0.6, color="tab:blue")
        middle = statistics.median(v for run in runs for v in run)
        ax.axhline(GOALS[goal], color="tab:red", linestyle="--", label=f"goal {GOALS[goal]:g}x")
        ax.axhline(middle, color="tab:green", label=f"pooled median {middle:.2f}x")
        ax.set(title=TITLES.get(goal, goal), xlabel="run", ylabel="throughput ratio",
               xticks=range(len(runs)))
        ax.legend(loc="best", fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


# --- main -----------------------------------------------------------------------------


def profile() -> None:
    import cProfile
    import pstats

    from dask_merge import merge_pair

    nucleotide, protein = big_pair()
    output = str(DATA / "kernel-out" / "profile_merged.pt")
    (DATA / "kernel-out").mkdir(exist_ok=True)
    merge_pair(nucleotide, protein, output)  # warm the page cache
    profiler = cProfile.Profile()
    profiler.enable()
    merge_pair(nucleotide, protein, output)
    profiler.disable()
    pstats.Stats(profiler).sort_stats("cumulative").print_stats(30)
    pstats.Stats(profiler).sort_stats("tottime").print_stats(15)


PARTS = ["kernel", "scaling", "overhead", "mixed", "rerun"]
MIXED_SETS = [(200, 8), (1000, 40)]


def main(argv: list[str] | None = None) -> None:  # noqa: C901 - one step per part
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, help="repetitions of each variant (default 5, quick 2)")
    parser.add_argument("--quick", action="store_true",
                        help="2 repetitions, 4 scaling pairs, 200 tiny pairs")
    parser.add_argument("--only", choices=[*PARTS, "machine"], action="append",
                        help="run only this part (repeatable)")
    parser.add_argument("--scaling-pairs", type=int, help="big pairs for scaling (default 16)")
    parser.add_argument("--tiny-pairs", type=int, help="tiny pairs for overhead (default 2000)")
    parser.add_argument("--fixed", type=int, nargs="*", default=[8, 26],
                        help="fixed pairs per task the mixed sets also run with (default 8 26)")
    parser.add_argument("--mixed", action="append", metavar="TINYxBIG",
                        help="mixed set(s) to run, e.g. 1000x40 (default 200x8 and 1000x40; quick 200x8)")
    parser.add_argument("--rerun-pairs", type=int, help="checkpointed pairs for rerun (default 20000)")
    parser.add_argument("--profile", action="store_true", help="cProfile merge_pair on the big pair")
    parser.add_argument("--pool", nargs="+", type=Path, metavar="RESULT",
                        help="pool the paired ratios of these results/*.json files; run nothing")
    parser.add_argument("--plot", type=Path, metavar="PNG",
                        help="with --pool: also plot each repetition's ratio against the goal")
    parser.add_argument("--baseline", metavar="CHECKOUT",
                        help="machine, scaling and overhead parts: also run from this checkout "
                             "(e.g. a `git archive` of an older commit), interleaved")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.pool:
        ratios, commits = pooled(args.pool)
        print(pooled_report(ratios, commits, len(args.pool)))
        if args.plot:
            plot_pooled(ratios, args.plot)
        return

    if args.child:
        kind, *rest = json.loads(args.child)
        print(json.dumps(CHILDREN[kind](*rest)))
        return
    DATA.mkdir(parents=True, exist_ok=True)
    if args.profile:
        profile()
        return
    repeat = args.repeat or (2 if args.quick else 5)
    parts = args.only or PARTS
    mixed_sets = MIXED_SETS[:1] if args.quick else MIXED_SETS
    if args.mixed:
        mixed_sets = [tuple(map(int, spec.lower().split("x"))) for spec in args.mixed]
    rerun_pairs = args.rerun_pairs or (2000 if args.quick else 20_000)
    scaling_pairs = args.scaling_pairs or (4 if args.quick else 16)
    tiny_pairs = args.tiny_pairs or (200 if args.quick else 2000)

    # Make every input first, so that no timing runs beside a writer.
    if {"kernel", "scaling", "machine"} & set(parts):
        big_pair()
    if "scaling" in parts:
        scaling_set(scaling_pairs)
    if "overhead" in parts:
        tiny_set(tiny_pairs)
    if "mixed" in parts:
        for tiny, big in mixed_sets:
            for order in ORDERS:
                mixed_set(tiny, big, order)
    if "rerun" in parts:
        checkpointed_set(rerun_pairs)

    results: dict = {"machine": machine(), "repeat": repeat, "argv": sys.argv[1:]}
    started = time.perf_counter()
    if "kernel" in parts:
        results["kernel"] = bench_kernel(repeat)
    if "scaling" in parts:
        results["scaling"] = bench_scaling(repeat, scaling_pairs, args.baseline)
    if "overhead" in parts:
        results["overhead"] = bench_overhead(repeat, tiny_pairs, args.baseline)
    if "mixed" in parts:
        results["mixed"] = bench_mixed(repeat, mixed_sets, args.fixed)
    if "rerun" in parts:
        results["rerun"] = bench_rerun(repeat, rerun_pairs)
    if "machine" in parts:
        results["machine_part"] = machine_runs = bench_machine(repeat, args.baseline)
        for name, runs in machine_runs["runs"].items():
            print(f"{name:15s} {median(runs):.3f} s ({spread(runs)})  peak {median(runs, 'peak_mb'):.0f} MiB")
    results["bench_seconds"] = time.perf_counter() - started

    RESULTS.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (RESULTS / f"bench-{stamp}.json").write_text(json.dumps(results, indent=1))
    print(report(results))
    _log(f"raw results: {RESULTS / f'bench-{stamp}.json'}; {results['bench_seconds']:.0f} s")


if __name__ == "__main__":
    main()
