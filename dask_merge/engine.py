"""The Dask engine: plan the pairs, map the merge over a bag, gather small records.

:func:`plan` finds the pairs and drops the checkpointed ones on the client,
so they never occupy a worker.  :meth:`Plan.execute` cuts the rest into
batches and maps :func:`~dask_merge.tasks.merge_pairs` over them on one of
these schedulers:

==============  ==================================================================
``processes``   the default: Dask's processes scheduler on a pool of processes
                forked from a clean fork server, nothing else to start; they
                hold Dask's core and the kernel, not distributed or torch,
                nor anything of the parent's ``__main__`` script
``threads``     one process, a thread pool
``sync``        one process, one thread, plain loop: for debugging (pdb works)
``local``       a :class:`distributed.LocalCluster` started and closed here, with
                its dashboard
an address      ``tcp://host:port`` of an existing Dask scheduler (or pass
                ``scheduler_file=``): workers must see the same paths
==============  ==================================================================

The batches are the partitions of a :mod:`dask.bag`, one task each.
Workers send back one small :class:`Record` per pair, never tensors: each task
writes its own output.

>>> import dask_merge
>>> job = dask_merge.plan("features/", output_dir="merged/")  # doctest: +SKIP
>>> job  # doctest: +SKIP
<Plan: 118 pending, 2 checkpointed, 0 without a partner -> merged/>
>>> job.execute("processes", workers=4)  # doctest: +SKIP
<Report: merged 117, skipped 2, failed 1 in 96.3 s on processes>
"""

from __future__ import annotations

import contextlib
import difflib
import html
import inspect
import json
import logging
import numbers
import os
import re
import sys
import time
import urllib.parse
import warnings
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass

import dask
import dask.bag as db
import dask.local
import dask.multiprocessing
import dask.threaded
from dask.base import tokenize
from dask.utils import parse_timedelta

from ._worker_main import pool_context
from .atomic import atomic_write, remove_stale_temporaries
from .layouts import MERGED_SUFFIX, NUCLEOTIDE_SUFFIX, PROTEIN_SUFFIX, label_value
from .merge import check_max_dropped
from .partition import partition
from .pairs import RECORD_FOLDER, Checkpoint, Pair, checkpoint_state, find_pairs
from .sources import ProteinSpec, is_h5, spec_paths
from .tasks import (  # noqa: F401 (merge_one)
    Record, crashed, keep_read_buffers, merge_one, merge_pairs, pool_worker,
)

# Dask's local schedulers as functions: given by name, ``compute`` first imports
# distributed to look for a default client, 0.2 s of every run.
LOCAL_SCHEDULERS = {
    "processes": dask.multiprocessing.get,
    "threads": dask.threaded.get,
    "sync": dask.local.get_sync,
}
TASK_NAME = "merge-pair"  # what tasks are called on the dashboard
HTML_ROWS = 200  # rows of a plan or report shown in a notebook
CONNECT_TIMEOUT = "5s"
DROP_WARNING = 0.1  # see Report.warnings


class ConfigurationError(ValueError):
    """The run cannot start: a missing folder, no pairs, a bad scheduler, ..."""


# --- the report ----------------------------------------------------------------


@dataclass(repr=False)
class Report:
    """The outcome of a run: one record per pair found, skipped ones included.

    >>> Report([Record("output_0", "merged", rows=300), Record("output_1", "skipped"),
    ...         Record("output_2", "failed", error="truncated")], [], 3.14, "processes")
    <Report: merged 1, skipped 1, failed 1 in 3.1 s on processes>
    """

    records: list[Record]
    unpaired: list[str]
    seconds: float
    scheduler: str
    dashboard: str | None = None

    @property
    def counts(self) -> dict[str, int]:
        counts = dict.fromkeys(("merged", "skipped", "failed"), 0)
        for record in self.records:
            counts[record.status] += 1
        return counts

    @property
    def failures(self) -> list[Record]:
        return [r for r in self.records if r.status == "failed"]

    @property
    def ok(self) -> bool:
        return not self.failures

    def to_dict(self) -> dict:
        """The JSON report: ``counts``, ``seconds``, ``pairs``, ``unpaired`` (a stable contract)."""
        return {
            "counts": self.counts,
            "seconds": round(self.seconds, 3),
            "pairs": [r.to_dict() for r in self.records],
            "unpaired": self.unpaired,
            "scheduler": self.scheduler,
            "dashboard": self.dashboard,
        }

    def to_json(self, path: str) -> None:
        """Write the report to ``path``, complete or not at all (:class:`OutputError`)."""
        text = json.dumps(self.to_dict(), indent=1)
        atomic_write(path, lambda f: f.write(text.encode()), durable=False)

    def summary(self, errors: int = 5) -> str:
        """A few lines for a terminal: counts, ids dropped on each side, failures."""
        counts = self.counts
        merged = [r for r in self.records if r.status == "merged"]
        rows = sum(r.rows or 0 for r in merged)
        lines = [
            f"merged {counts['merged']}, skipped {counts['skipped']}, failed {counts['failed']} "
            f"pairs; {rows:,} rows written in {self.seconds:.1f} s ({self.scheduler})"
        ]
        if merged:
            lines.append("ids dropped: " + "; ".join(
                _dropped(merged, side, partner)
                for side, partner in (("nucleotide", "protein"), ("protein", "nucleotide"))))
        if self.unpaired:
            lines.append(f"{len(self.unpaired)} files without a partner, e.g. {self.unpaired[0]}")
        for record in self.failures[:errors]:
            lines.append(f"  FAILED {record.name}: {record.error.splitlines()[0]}")
        if len(self.failures) > errors:
            lines.append(f"  ... and {len(self.failures) - errors} more failures")
        return "\n".join(lines)

    def warnings(self, share: float = DROP_WARNING) -> list[str]:
        """Lines about merged pairs that dropped more than ``share`` of a file's ids.

        Real chunks drop few: every protein comes from one of the chunk's
        sequences, and only sequences without an ORF lose their protein
        vector (the upstream test data drop none).  A larger share means two
        files of different runs or chunks, e.g. a wrong ``--protein-dir``.
        """
        lines = []
        for side, partner in (("nucleotide", "protein"), ("protein", "nucleotide")):
            over = [r for r in self.records if r.status == "merged" and _share(r, side) > share]
            if over:
                worst = max(over, key=lambda r: _share(r, side))
                lines.append(
                    f"WARNING: {len(over)} merged pairs drop more than {share:.0%} of their {side} "
                    f"ids (worst: {worst.name}, {_dropped_of(worst, side)} without a {partner} "
                    f"vector): are the folders of one run? (max_dropped, --max-dropped, makes such pairs fail)")
        return lines

    def __repr__(self) -> str:
        counts = ", ".join(f"{k} {v}" for k, v in self.counts.items())
        return f"<Report: {counts} in {self.seconds:.1f} s on {self.scheduler}>"

    def _repr_html_(self) -> str:
        counts = ", ".join(f"{k} {v}" for k, v in self.counts.items())
        rows = [(r.name, r.status, "" if r.rows is None else r.rows,
                 "" if r.nucleotide_only is None else f"{r.nucleotide_only} + {r.protein_only}",
                 "" if r.seconds is None else f"{r.seconds:.2f}", (r.error or r.reason or "")[:200])
                for r in self.records]
        return _html_table(
            f"<b>dask_merge report</b>: {counts} in {self.seconds:.1f} s on {_html(self.scheduler)}",
            ("pair", "status", "rows", "dropped", "seconds", "error"), rows)


def _dropped_count(record: Record, side: str) -> int:
    return getattr(record, f"{side}_only") or 0


def _share(record: Record, side: str) -> float:
    """The share of ``side``'s ids that a merged pair dropped."""
    dropped = _dropped_count(record, side)
    return dropped / ((record.rows or 0) + dropped or 1)


def _dropped_of(record: Record, side: str) -> str:
    dropped = _dropped_count(record, side)
    return f"{dropped:,} of {(record.rows or 0) + dropped:,}"


def _dropped(merged: list[Record], side: str, partner: str) -> str:
    """``side``'s ids dropped in all, and the pair that dropped the largest share."""
    total = sum(_dropped_count(r, side) for r in merged)
    if not total:
        return f"no {side} id without a {partner} vector"
    worst = max(merged, key=lambda r: _share(r, side))
    return (f"{total:,} {side} ids without a {partner} vector "
            f"(worst: {worst.name}, {_dropped_of(worst, side)})")


def _html(value: object) -> str:
    """``value`` escaped for HTML, with undecodable file-name bytes shown as ``\\udcff``.

    Jupyter sends HTML as UTF-8, which a lone surrogate would break.

    >>> _html("<b>" + os.fsdecode(b"\\xff"))
    '&lt;b&gt;\\\\udcff'
    """
    return html.escape(str(value)).encode("utf-8", "backslashreplace").decode("utf-8")


def _html_table(title: str, head: tuple[str, ...], rows: list[tuple]) -> str:
    """A title, a table of the first :data:`HTML_ROWS` rows, and how many more there are."""
    heads = "".join(f"<th>{h}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{_html(v)}</td>" for v in row) + "</tr>"
                   for row in rows[:HTML_ROWS])
    more = f"<p>... {len(rows) - HTML_ROWS} more</p>" if len(rows) > HTML_ROWS else ""
    return f"<p>{title}</p><table><tr>{heads}</tr>{body}</table>{more}"


# --- the plan ----------------------------------------------------------------


@dataclass(repr=False)
class Plan:
    """The pairs to merge and those already done; :meth:`execute` runs it.

    A plan is what was found when it was made.  :meth:`execute` checks the
    pending pairs again (unless ``force``): those merged since, by an earlier
    execute of this plan or by another run, are skipped; and a checkpointed
    pair whose output has gone since is merged.

    >>> pair = Pair("output_0", "in/output_0_DNABERT_S.pt", "in/output_0_ESM.pt",
    ...             "out/output_0_merged.pt")
    >>> Plan([pair], [], ["in/output_1_ESM.pt"], None, "out")
    <Plan: 1 pending, 0 checkpointed, 1 without a partner -> out>
    """

    pending: list[Pair]
    done: list[tuple[Pair, Checkpoint]]
    unpaired: list[str]
    labels: list[int] | None
    output_dir: str
    force: bool = False
    max_dropped: float | None = None

    @property
    def _merge_args(self) -> tuple:
        """What each task passes to :func:`~dask_merge.tasks.merge_pairs` after its pairs."""
        return self.labels, self.max_dropped

    def execute(
        self,
        scheduler: str = "processes",
        *,
        workers: int | None = None,
        scheduler_file: str | None = None,
        dashboard_address: str = "127.0.0.1:8787",
        progress: bool = True,
        retries: int = 1,
        partition_size: int | None = None,
        performance_report: str | None = None,
        client=None,
    ) -> Report:
        """Merge the pending pairs; return a :class:`Report`.

        Parameters
        ----------
        scheduler
            ``processes``, ``threads``, ``sync``, ``local`` or the address of a
            running Dask scheduler.  Ignored when ``client`` or
            ``scheduler_file`` is given.
        workers
            Worker processes (or threads) of the local schedulers and of a
            ``local`` cluster; default: the number of cores.  On an existing
            cluster (an address, ``scheduler_file`` or ``client``), batches
            are sized by the cluster's worker threads instead (this number
            only when it has no workers yet).
        scheduler_file
            The scheduler file of an existing cluster (dask-jobqueue, dask-mpi).
        dashboard_address
            Where a ``local`` cluster serves its dashboard; another free port
            is used when that one is taken.
        progress
            Draw a progress bar (a widget in notebooks).
        retries
            How often a pair whose worker died (or raised) is tried again
            before it is reported failed.
        partition_size
            Pairs per task; by default tasks of about equal input bytes
            (see :func:`dask_merge.partition.partition`): one per pair for
            large pairs, batches of up to about 32 MiB of input for tiny
            ones, at least four tasks per worker thread, the biggest first.
        performance_report
            On a cluster: write Dask's HTML performance report there.
        client
            An existing :class:`distributed.Client` to run on.
        """
        _check_options(scheduler, client, scheduler_file, workers=workers, retries=retries,
                       partition_size=partition_size, progress=progress)
        # numpy's ints pass the check; distributed asserts Python ints.
        workers, retries, partition_size = (
            None if n is None else int(n) for n in (workers, retries, partition_size))
        workers = workers or os.cpu_count() or 1
        pending, done = self._still_pending()
        skipped = [Record(p.name, "skipped", reason=c.reason, output=p.output) for p, c in done]
        start = time.perf_counter()
        given = _on_a_cluster(client, scheduler_file)
        local = not given and scheduler in LOCAL_SCHEDULERS
        if pending and local and scheduler == "processes":
            pool_context()  # the workers' imports, meanwhile
        folders = {os.path.dirname(p.output) for p in pending}
        folders |= {os.path.join(f, RECORD_FOLDER) for f in folders}  # and the records'
        for folder in folders:
            # A killed run's temporaries go now; one a live writer holds, never.
            remove_stale_temporaries(folder)
        dashboard = None
        try:
            if not pending:
                records = []
            elif not local:
                with _distributed_client(scheduler, scheduler_file, client, workers,
                                         dashboard_address, retries) as active:
                    dashboard = active.dashboard_link
                    if dashboard:  # with or without progress bars: where to watch the run
                        print(f"dask-merge: dashboard at {dashboard}"
                              f"{_port_note(dashboard, scheduler, dashboard_address)}",
                              file=sys.stderr)
                    # Batches for the threads the cluster has, not for this machine's cores.
                    threads = _cluster_threads(active) or workers
                    partitions = _partitions(pending, partition_size, threads)
                    records = _run_distributed(active, partitions, self._merge_args, retries=retries,
                                               progress=progress,
                                               performance_report=performance_report)
            else:
                partitions = _partitions(pending, partition_size, workers)
                if scheduler == "processes":
                    records = _run_processes(partitions, self._merge_args, workers=workers,
                                             retries=retries, progress=progress)
                else:
                    records = _run_local(partitions, self._merge_args, scheduler, workers, progress)
        except KeyboardInterrupt:
            # The pool or cluster is down by now; what its workers were
            # writing is unlocked and can go at once.
            for folder in folders:
                remove_stale_temporaries(folder)
            raise
        for folder in folders:  # left by workers that died mid-write (and were retried)
            remove_stale_temporaries(folder)
        order = {p.name: i for i, p in enumerate(pending)}
        records.sort(key=lambda r: order[r.name])
        return Report(skipped + records, self.unpaired, time.perf_counter() - start,
                      "cluster" if given else scheduler, dashboard)

    def _still_pending(self) -> tuple[list[Pair], list[tuple[Pair, Checkpoint]]]:
        if self.force:
            return self.pending, self.done
        # Those done at planning are checked again only if their output went
        # (a stat each); reading every record twice would cost more.
        gone = {p for p, _ in self.done if not os.path.isfile(p.output)}
        pending, done = _by_checkpoint(self.pending + [p for p, _ in self.done if p in gone],
                                       self.labels)
        return pending, [(p, c) for p, c in self.done if p not in gone] + done

    def __repr__(self) -> str:
        return (f"<Plan: {len(self.pending)} pending, {len(self.done)} checkpointed, "
                f"{len(self.unpaired)} without a partner -> {self.output_dir}>")

    def _repr_html_(self) -> str:
        rows = [(p.name, "pending", "") for p in self.pending]
        rows += [(p.name, "checkpointed", c.reason) for p, c in self.done]
        rows += [(os.path.basename(u), "no partner", u) for u in self.unpaired]
        return _html_table(
            f"<b>dask_merge plan</b>: {len(self.pending)} pending, {len(self.done)} checkpointed, "
            f"{len(self.unpaired)} without a partner; outputs in {_html(self.output_dir)}",
            ("pair", "state", "why"), rows)


def plan(
    nucleotide_dir: str | os.PathLike[str],
    protein_dir: ProteinSpec | None = None,
    output_dir: str | os.PathLike[str] | None = None,
    *,
    label: str | int | None = None,
    force: bool = False,
    max_dropped: float | None = None,
) -> Plan:
    """Find the pairs and which of them are already merged.

    ``label`` and ``max_dropped`` are those of :func:`~dask_merge.merge_pair`.
    ``protein_dir`` is the folder of the ``STEM_ESM.pt`` files, or the HDF5
    file that VirNucPro v2 writes (``"esm/embeddings.h5"``), or a list of its
    shards: each ``STEM_DNABERT_S.pt`` is then merged with its rows there
    (see :func:`~dask_merge.find_pairs`).

    Raises
    ------
    ConfigurationError
        A missing folder or HDF5 file, an output folder that cannot be
        written, no pairs, a bad label or ``max_dropped``.
    """
    if type(force) is not bool:
        raise ConfigurationError(f"force must be True or False, not {force!r}")
    try:
        check_max_dropped(max_dropped)
        labels = label_value(label)
        found = find_pairs(nucleotide_dir, protein_dir, output_dir)
    except (ValueError, FileNotFoundError) as err:
        raise ConfigurationError(str(err)) from None
    output_dir = os.fspath(output_dir if output_dir is not None else nucleotide_dir)
    if not found.pairs:
        if protein_dir is not None and is_h5(protein_dir):
            raise ConfigurationError(f"no pairs found: no STEM{NUCLEOTIDE_SUFFIX} in "
                                     f"{os.fspath(nucleotide_dir)}")
        raise ConfigurationError(_no_pairs(os.fspath(nucleotide_dir),
                                           os.fspath(protein_dir or nucleotide_dir)))
    try:
        os.makedirs(output_dir, exist_ok=True)
    except OSError as err:
        raise ConfigurationError(f"cannot create output folder {output_dir} ({err.strerror})") from None
    if not os.access(output_dir, os.W_OK | os.X_OK):
        raise ConfigurationError(f"output folder {output_dir} is not writable")
    records = os.path.join(output_dir, RECORD_FOLDER)
    if os.path.lexists(records) and not os.path.isdir(records):
        raise ConfigurationError(f"{records} is not a folder: the checkpoint records go there")
    pending, done = _by_checkpoint(found.pairs, labels, force=force)
    return Plan(pending, done, found.unpaired, labels, output_dir, force, max_dropped)


def _no_pairs(nucleotide_dir: str, protein_dir: str) -> str:
    """Why no pair was found, with what each folder holds instead."""
    def holds(folder: str) -> str:
        counts = {suffix: sum(1 for name in os.listdir(folder) if name.endswith(suffix)
                              and not name.startswith("."))
                  for suffix in (NUCLEOTIDE_SUFFIX, PROTEIN_SUFFIX, MERGED_SUFFIX)}
        return f"{folder} holds " + ", ".join(f"{n} STEM{suffix}" for suffix, n in counts.items())

    where = [holds(nucleotide_dir)] + ([holds(protein_dir)] if protein_dir != nucleotide_dir else [])
    hint = ""
    if (protein_dir != nucleotide_dir and not _has(nucleotide_dir, NUCLEOTIDE_SUFFIX)
            and _has(nucleotide_dir, PROTEIN_SUFFIX) and _has(protein_dir, NUCLEOTIDE_SUFFIX)):
        hint = "; were --nucleotide-dir and --protein-dir swapped?"
    return (f"no pairs found: no STEM{NUCLEOTIDE_SUFFIX} in {nucleotide_dir} has a "
            f"STEM{PROTEIN_SUFFIX} partner in {protein_dir} ({'; '.join(where)}){hint}")


def _has(folder: str, suffix: str) -> bool:
    return any(n.endswith(suffix) and not n.startswith(".") for n in os.listdir(folder))


def _by_checkpoint(pairs: list[Pair], labels: list[int] | None, *, force: bool = False
                   ) -> tuple[list[Pair], list[tuple[Pair, Checkpoint]]]:
    """The pairs to merge, and those done with why (see :func:`checkpoint_state`)."""
    pending, done = [], []
    for pair in pairs:
        state = checkpoint_state(pair, labels=labels, force=force)
        if state.done:
            done.append((pair, state))
        else:
            pending.append(pair)
    return pending, done


def run(
    nucleotide_dir: str | os.PathLike[str],
    protein_dir: ProteinSpec | None = None,
    output_dir: str | os.PathLike[str] | None = None,
    *,
    label: str | int | None = None,
    force: bool = False,
    max_dropped: float | None = None,
    **execute_options,
) -> Report:
    """Plan and execute in one call: ``plan(...).execute(**execute_options)``."""
    # Unknown options and bad values fail before planning creates the output folder.
    accepted = inspect.signature(Plan.execute)
    for name in execute_options.keys() - accepted.parameters.keys():
        close = difflib.get_close_matches(name, [*accepted.parameters, "label", "force", "max_dropped"], 1)
        raise TypeError(f"run() got an unexpected option {name!r}"
                        + (f"; did you mean {close[0]!r}?" if close else ""))
    given = accepted.bind(None, **execute_options)
    given.apply_defaults()
    options = given.arguments
    _check_options(**{k: v for k, v in options.items() if k != "self"})
    if options["scheduler"] == "processes" and not _on_a_cluster(options["client"],
                                                                 options["scheduler_file"]):
        pool_context()  # the pool's imports, while this process plans
    return plan(nucleotide_dir, protein_dir, output_dir, label=label, force=force,
                max_dropped=max_dropped).execute(
        **execute_options
    )


def _on_a_cluster(client, scheduler_file: str | None) -> bool:
    """Whether a run goes to an existing cluster, whatever its ``scheduler`` says."""
    return client is not None or bool(scheduler_file)


def _check_options(scheduler, client, scheduler_file, *, workers, retries, partition_size,
                   progress, **_others) -> None:
    """Refuse what :meth:`Plan.execute` cannot run with, naming it, before any work.

    Takes execute's arguments by name; those it does not check are ignored.

    >>> _check_options("thread", None, None, workers=None, retries=1, partition_size=None,
    ...                progress=True)
    Traceback (most recent call last):
    dask_merge.engine.ConfigurationError: unknown scheduler 'thread': processes, threads, sync, local or an address such as tcp://host:8786
    >>> _check_options("sync", None, None, workers=0, retries=1, partition_size=None, progress=True)
    Traceback (most recent call last):
    dask_merge.engine.ConfigurationError: workers must be an int of at least 1 (or None), not 0
    """
    for name, value, least, optional in (("workers", workers, 1, True),
                                         ("partition_size", partition_size, 1, True),
                                         ("retries", retries, 0, False)):
        if not (value is None and optional or (  # numpy's ints are Integral too
                isinstance(value, numbers.Integral) and not isinstance(value, bool)
                and value >= least)):
            raise ConfigurationError(f"{name} must be an int of at least {least}"
                                     f"{' (or None)' if optional else ''}, not {value!r}")
    if type(progress) is not bool:
        raise ConfigurationError(f"progress must be True or False, not {progress!r}")
    if client is not None:
        from distributed import Client

        if not isinstance(client, Client):
            raise ConfigurationError(f"client must be a distributed.Client, not a {type(client).__name__}")
    elif not scheduler_file and not (
        isinstance(scheduler, str) and (scheduler in LOCAL_SCHEDULERS or scheduler == "local"
                                        or ":" in scheduler)
    ):
        raise ConfigurationError(f"unknown scheduler {scheduler!r}: processes, threads, sync, "
                                 "local or an address such as tcp://host:8786")


# --- partitioning ----------------------------------------------------------------


def _partitions(pending: list[Pair], size: int | None, workers: int) -> list[list[Pair]]:
    """Split the pairs into tasks balanced by their input bytes (see :mod:`.partition`).

    ``size`` pairs per task, if given.  The costliest tasks are placed where
    Dask runs them first: among independent tasks it goes by key, not by
    position in the bag.
    """
    sizes = [_input_bytes(p) for p in pending]
    return _in_dask_order(partition(pending, sizes, threads=workers, pairs_per_task=size))


def _input_bytes(pair: Pair) -> int:
    """The bytes of a pair's inputs (0 for one gone: its merge will say why)."""
    total = 0
    for path in (pair.nucleotide, pair.protein):
        with contextlib.suppress(OSError):
            if isinstance(path, str):
                total += os.stat(path).st_size
            else:
                # From the HDF5 of the whole data set a pair reads its own rows: a
                # 2560-float32 row (10 KB) per 768-pickled-float row (7 KB).
                total += os.stat(pair.nucleotide).st_size
    return total


def _in_dask_order(tasks: list[list[Pair]]) -> list[list[Pair]]:
    """Place ``tasks[0]`` at the bag index Dask runs first, ``tasks[1]`` second, ...

    Dask orders independent tasks by their keys, ``(name, index)``, so the
    positions depend on the number of tasks only (see :func:`_run_order`).
    """
    placed: list[list[Pair]] = [[] for _ in tasks]
    for slot, task in zip(_run_order(len(tasks)), tasks):
        placed[slot] = task
    return placed


def _run_order(tasks: int) -> list[int]:
    """The bag indices of ``tasks`` independent tasks in the order Dask runs them.

    :func:`dask.order.order` breaks the tie between independent tasks by the
    text of their keys, the greatest first; it costs ~0.1 ms a task, so its
    rule is applied here (``tests/test_partition.py`` checks it against
    Dask's own order).

    >>> _run_order(12)
    [9, 8, 7, 6, 5, 4, 3, 2, 11, 10, 1, 0]
    """
    return sorted(range(tasks), key=lambda i: str((TASK_NAME, i)), reverse=True)


def _bag(partitions: list[list[Pair]], merge_args: tuple) -> db.Bag:
    """A bag with one task per partition, :func:`merge_pairs` of its pairs and ``merge_args``.

    The pairs are the tasks' arguments, not keys of their own: the dashboard
    and the progress widget count ``merge-pair`` tasks only.
    """
    # Plain tuples: Dask walks a namedtuple argument to rebuild it (40 ms for
    # 2,000 pairs); merge_pairs makes Pairs again.
    batches = [tuple(map(tuple, part)) for part in partitions]
    # Named after the outputs and the cut, hashed as one string: tokenizing
    # the nested tuples costs 30 ms per 2,000 pairs.
    outputs = "\n".join(pair.output for part in partitions for pair in part)
    name = f"{TASK_NAME}-{tokenize(outputs, [len(b) for b in batches], merge_args)}"
    graph = {(name, i): (merge_pairs, batch, *merge_args) for i, batch in enumerate(batches)}
    return db.Bag(graph, name, len(partitions))


# --- local schedulers --------------------------------------------------------------


def _progress_bar(progress: bool):
    from dask.diagnostics import ProgressBar

    return ProgressBar(out=sys.stderr) if progress else contextlib.nullcontext()


def _run_local(partitions, merge_args, scheduler: str, workers: int, progress: bool) -> list[Record]:
    with _progress_bar(progress):
        parts = _bag(partitions, merge_args).to_delayed()
        results = dask.compute(*parts, scheduler=LOCAL_SCHEDULERS[scheduler], num_workers=workers)
    return [record for part in results for record in part]


def _run_processes(partitions, merge_args, *, workers: int, retries: int, progress: bool) -> list[Record]:
    """Run on a process pool and survive workers that die.

    A dead child breaks the whole pool (``BrokenProcessPool``).  The tasks
    that had finished keep their records; those that had not started run in a
    fresh pool; those running when it broke are suspects, retried one by one
    in pools of their own, so the culprit is found and reported and no
    innocent pair is blamed.
    """
    records: list[Record] = []
    remaining = list(partitions)
    while remaining:
        finished, running, broken = _compute_in_pool(remaining, merge_args, workers, progress)
        records += [r for part in finished.values() for r in part]
        if not broken:
            break
        records += _isolate(
            [remaining[i] for i in sorted(running)], merge_args, retries, progress
        )
        remaining = [p for i, p in enumerate(remaining) if i not in finished and i not in running]
    return records


def _isolate(suspects, merge_args, retries: int, progress: bool) -> list[Record]:
    records = []
    pairs = [pair for part in suspects for pair in part]
    # Each died once already, when the pool broke: a lone suspect surely, so
    # it has `retries` tries left; of several, each runs alone at least once
    # to tell the culprit from the innocent.
    tries = retries if len(pairs) == 1 else max(retries, 1)
    for pair in pairs:
        for attempt in range(tries):
            finished, _, broken = _compute_in_pool([[pair]], merge_args, 1, progress)
            if not broken:
                records += finished[0]
                break
        else:
            records += crashed([pair], f"the worker process died while merging {pair.name} "
                                       f"({tries + 1} times): crashed or killed (out of memory?)")
    return records


def _start_pool(workers: int) -> ProcessPoolExecutor:
    """A pool of ``workers`` processes, started as tasks are submitted.

    A worker unpickles :func:`~dask_merge.tasks.pool_worker` and Dask's task
    runner: it holds the kernel, numpy and Dask's core, not distributed or
    torch, nor the parent's ``__main__`` script (but where workers are
    spawned, on Windows).
    """
    threads = max(1, (os.cpu_count() or 1) // workers)
    return ProcessPoolExecutor(workers, mp_context=pool_context(),
                               initializer=pool_worker, initargs=(threads,))


def _compute_in_pool(partitions, merge_args, workers: int, progress: bool):
    """Compute the bag on Dask's processes scheduler with a new pool.

    Returns (finished, running, broken): ``finished`` maps partition index
    to records, ``running`` holds the indices of tasks in flight when the
    pool broke (the suspects).
    """
    from dask.callbacks import Callback

    bag = _bag(partitions, merge_args)
    started: set[int] = set()
    finished: dict[int, list[Record]] = {}

    def pretask(key, dsk, state):
        if isinstance(key, tuple) and key[0] == bag.name:
            started.add(key[1])

    def posttask(key, result, dsk, state, worker_id):
        if isinstance(key, tuple) and key[0] == bag.name:
            finished[key[1]] = result

    pool = _start_pool(workers)
    broken = False
    try:
        with Callback(pretask=pretask, posttask=posttask), _progress_bar(progress):
            # chunksize=1: each task is sent alone, so a few long merges run
            # side by side (dask/dask#10292).  Unoptimized: fusion would run
            # each merge under another key than (bag.name, i), and a crash
            # could not be traced to its pairs.  The partitions, not the bag:
            # bag.compute adds a task that ships every record to a worker to
            # be joined into one list (65 ms for 2,000 pairs), which posttask
            # has already collected.
            dask.compute(*bag.to_delayed(optimize_graph=False), optimize_graph=False,
                         scheduler=LOCAL_SCHEDULERS["processes"], pool=pool, chunksize=1)
    except BrokenProcessPool:
        broken = True
    except BaseException:  # Ctrl-C: stop the children now, not after their pair
        for process in list((getattr(pool, "_processes", None) or {}).values()):
            process.terminate()
        raise
    finally:
        pool.shutdown(wait=not broken, cancel_futures=True)
    return finished, started - finished.keys(), broken


# --- distributed --------------------------------------------------------------------


@contextlib.contextmanager
def _distributed_client(scheduler, scheduler_file, client, workers, dashboard_address,
                        retries) -> Iterator:
    from distributed import Client, LocalCluster

    if client is not None:
        yield client
        return
    if scheduler == "local" and not scheduler_file:
        # A task whose worker dies is tried again on another, `retries` times
        # (on an existing cluster, its own allowed-failures setting rules).
        # One task at a time per worker: a dying worker takes down only the
        # pair it runs, never an innocent one queued behind it.
        with dask.config.set({"distributed.scheduler.allowed-failures": retries,
                              "distributed.scheduler.worker-saturation": 1.0}), \
                _quiet_dashboard(), LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                             host="127.0.0.1", dashboard_address=dashboard_address) as cluster, \
                Client(cluster) as local:
            local.run(keep_read_buffers)  # its workers live for this run only
            yield local
        return
    target = {"scheduler_file": scheduler_file} if scheduler_file else {"address": scheduler}
    if scheduler_file:
        _wait_for_file(scheduler_file)  # distributed would wait for it forever
    try:
        remote = Client(**target, timeout=CONNECT_TIMEOUT)
    except (OSError, TimeoutError, ValueError, KeyError, AssertionError) as err:
        # KeyError, AssertionError: a scheduler file without the scheduler's address
        where = scheduler_file or scheduler
        raise ConfigurationError(f"cannot reach a Dask scheduler at {where}: {err}") from None
    with remote:
        yield remote


class _DashboardNoise(logging.Filter):
    """Drop what a LocalCluster's dashboard logs that is no fault of the run.

    "Port 8787 is already in use": the run says itself which port it took
    (:func:`_port_note`).  A browser tab closed while the dashboard set up
    its websocket or sent it an update: tornado logs a traceback.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "is already in use" in message:
            return False
        # A tab closed as its page loads fails in bokeh's websocket handler
        # (an AssertionError in its on_close), which tornado logs with a traceback.
        if re.match(r"Uncaught exception GET \S*/ws\b", message):
            return False
        error = record.exc_info[1] if record.exc_info else None
        return type(error).__name__ not in ("WebSocketClosedError", "StreamClosedError")


@contextlib.contextmanager
def _quiet_dashboard() -> Iterator[None]:
    """Within this block, :class:`_DashboardNoise` stays out of the run's output."""
    noise = _DashboardNoise()
    loggers = [logging.getLogger(name) for name in ("distributed.node", "tornado.application",
                                                      "bokeh.server.protocol_handler")]
    for logger in loggers:
        logger.addFilter(noise)
    try:
        with warnings.catch_warnings():  # distributed warns of a taken port, too
            warnings.filterwarnings("ignore", "Port .* is already in use", UserWarning)
            yield
    finally:
        for logger in loggers:
            logger.removeFilter(noise)


def _port_note(link: str, scheduler: str, wanted: str) -> str:
    """Say so when a ``local`` cluster's dashboard took another port than the one asked for.

    >>> _port_note("http://127.0.0.1:40123/status", "local", "127.0.0.1:8787")
    ' (port 8787 was taken)'
    >>> _port_note("http://127.0.0.1:8787/status", "local", "127.0.0.1:8787")
    ''
    """
    if scheduler != "local":
        return ""
    wanted_port = wanted.rpartition(":")[2]
    port = urllib.parse.urlsplit(link).port
    return f" (port {wanted_port} was taken)" if wanted_port.isdigit() and port != int(wanted_port) else ""


def _wait_for_file(path: str) -> None:
    """Wait up to the connect timeout for a scheduler to write its file (dask-mpi starts both)."""
    deadline = time.monotonic() + parse_timedelta(CONNECT_TIMEOUT)
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise ConfigurationError(f"scheduler file {path} does not exist "
                                     f"(waited {CONNECT_TIMEOUT} for a scheduler to write it)")
        time.sleep(0.1)


def _paths_visible(paths: list[str]) -> list[str]:
    """Run on a worker: which of ``paths`` it cannot see."""
    return [p for p in paths if not os.path.exists(p)]


def _cluster_threads(client) -> int:
    """Worker threads of the cluster behind ``client`` now (0 when it has no workers yet)."""
    return sum(client.nthreads().values())


def _run_distributed(client, partitions, merge_args, *, retries, progress, performance_report):
    from distributed import performance_report as dask_report

    first = partitions[0][0]
    missing = client.submit(_paths_visible, [first.nucleotide, *spec_paths(first.protein),
                                             os.path.dirname(first.output)], pure=False).result()
    if missing:
        raise ConfigurationError(
            f"a Dask worker cannot see {missing[0]}: workers must see the same paths as the "
            "client (a shared file system, mounted at the same place)"
        )
    report = dask_report(filename=performance_report) if performance_report else contextlib.nullcontext()
    with report:
        records, dead = _compute_on_cluster(client, partitions, merge_args, retries, progress)
        # A batch that killed its workers holds a culprit and, as likely,
        # innocent pairs: each of its pairs runs alone, as on the pool.
        alone = [[pair] for part, _ in dead if len(part) > 1 for pair in part]
        if alone:
            more, dead_alone = _compute_on_cluster(client, alone, merge_args, retries, progress)
            records += more
            dead = [(part, why) for part, why in dead if len(part) == 1] + dead_alone
    for part, why in dead:
        records += crashed(part, why)
    return records


def _compute_on_cluster(client, partitions, merge_args, retries: int, progress: bool):
    """Compute the bag on the cluster.

    Returns the records and the partitions whose task killed every worker
    that ran it (``KilledWorker``), each with why.
    """
    from distributed import KilledWorker, as_completed

    futures = client.compute(_bag(partitions, merge_args).to_delayed(), retries=retries)
    index = {f.key: i for i, f in enumerate(futures)}
    shown = _show_progress(client, futures) if progress else None
    records: list[Record] = []
    dead = []
    # Waiting on futures blocks on a lock, not on the event loop: the
    # client's IO loop (its own thread) keeps running, and with it the widget.
    for future in as_completed(futures):
        try:
            records += future.result()
        except KilledWorker as err:
            why = f"the Dask worker died while merging ({type(err).__name__}: {err})"
            dead.append((partitions[index[future.key]], why))
        except Exception as err:  # not the pairs' doing: the worker's environment
            why = f"the Dask task failed ({type(err).__name__}: {err})"
            records += crashed(partitions[index[future.key]], why)
    if shown is not None:
        shown.finish()
    return records, dead


class _Widget:
    """distributed's progress widget, listening on the client's IO loop.

    ``progress(futures, notebook=True)`` schedules the widget's updates on
    the kernel's event loop (``IOLoop.current()``), which the running cell
    blocks until the run ends: the widget would stay empty.  A synchronous
    client runs its own IO loop in a thread, and that one is free.
    """

    def __init__(self, client, futures):
        import asyncio

        from distributed.diagnostics.progressbar import progress
        from IPython.display import display

        self.bar = progress(futures, notebook=True, scheduler=client.scheduler.address)
        display(self.bar.widget)
        self.listening = asyncio.run_coroutine_threadsafe(self.bar.listen(),
                                                          client.loop.asyncio_loop)

    def finish(self, timeout: float = 10) -> None:
        """Wait for the widget's last update (every task has ended by now)."""
        import concurrent.futures

        try:
            self.listening.result(timeout)
        except concurrent.futures.TimeoutError:
            self.listening.cancel()
        except Exception:  # the scheduler went away: the widget shows what it saw
            pass


def _show_progress(client, futures) -> _Widget | None:
    """In a notebook, display the progress widget and return it; elsewhere, draw a
    text bar until every task has ended (and return None)."""
    from distributed.diagnostics.progressbar import progress
    from distributed.utils import is_kernel

    if is_kernel() and not client.asynchronous:
        with contextlib.suppress(ImportError):  # no ipywidgets: the text bar
            return _Widget(client, futures)
    # The bar is progress, not a result: stderr.  distributed draws it on
    # sys.stdout, from its IO loop's thread, while this one waits for it.
    with contextlib.redirect_stdout(sys.stderr):
        progress(futures, notebook=False, scheduler=client.scheduler.address)
    return None
