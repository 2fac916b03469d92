"""Plan a run, then execute it: :func:`plan`, :class:`Plan`, :func:`run`.

:func:`plan` finds the pairs and drops the checkpointed ones on the client,
so they never occupy a worker; it stats files and opens none.
:meth:`Plan.execute` hands the pending pairs to an executor
(:mod:`dask_merge.executors`: a plain loop or threads, the process pool,
a Dask cluster) and gathers one small record per pair into a
:class:`~dask_merge.report.Report`.  Nothing here imports Dask: a run with
nothing pending imports and starts nothing.

>>> import dask_merge
>>> job = dask_merge.plan("features/", output_dir="merged/")  # doctest: +SKIP
>>> job  # doctest: +SKIP
<Plan: 118 pending, 2 checkpointed, 0 without a partner -> merged/>
>>> job.execute("processes", workers=4)  # doctest: +SKIP
<Report: merged 117, skipped 2, failed 1 in 96.3 s on processes>
"""

from __future__ import annotations

import difflib
import inspect
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .atomic import remove_stale_temporaries
from .errors import ConfigurationError
from .executors import Executor, get_executor
from .layouts import NUCLEOTIDE_SUFFIX, PROTEIN_SUFFIX, label_value
from .merge import check_max_dropped
from .checkpoints import RECORD_FOLDER, Checkpoint, labelled_checkpoint_state
from .pairs import Pair, build_pairs, find_pairs, no_pairs_message
from .report import Report, _html, _html_table
from .sources import ProteinSpec
from .tasks import Record

if TYPE_CHECKING:
    import dask.bag


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
    labels: list[int] | None  # as stored in each output: label_value(label)
    output_dir: str | None  # None: explicit pairs that write into several folders
    force: bool = False
    max_dropped: float | None = None

    @property
    def _merge_args(self) -> tuple:
        """What each task passes to :func:`~dask_merge.tasks.merge_pairs` after its pairs."""
        return self.labels, self.max_dropped

    def execute(self, scheduler: str | Executor = "processes", **options) -> Report:
        """Merge the pending pairs; return a :class:`~dask_merge.report.Report`.

        Parameters
        ----------
        scheduler
            ``processes``, ``threads``, ``sync``, ``local`` or the address of a
            running Dask scheduler (ignored when ``client`` or
            ``scheduler_file`` is given); or an executor made by
            :func:`~dask_merge.executors.get_executor`, without options.
        workers : int, optional
            Worker processes (or threads) of the local schedulers and of a
            ``local`` cluster; default: the number of cores.  On an existing
            cluster (an address, ``scheduler_file`` or ``client``), tasks
            are cut for the cluster's worker threads instead (this number
            only when it has no workers yet).
        scheduler_file : str, optional
            The scheduler file of an existing cluster (dask-jobqueue, dask-mpi).
        dashboard_address : str
            Where a ``local`` cluster serves its dashboard (default
            ``127.0.0.1:8787``); another free port is used when that one is taken.
        progress : bool
            Draw a progress bar (a widget in notebooks); default True.
        retries : int
            How often a pair whose worker died (or raised) is tried again
            before it is reported failed; default 1.
        partition_size : int, optional
            Pairs per task; by default tasks of about equal input bytes
            (see :func:`dask_merge.partition.partition`): one per pair for
            large pairs, batches of up to about 32 MiB of input for tiny
            ones, at least four tasks per worker thread, the biggest first.
        performance_report : str, optional
            On a cluster: write Dask's HTML performance report there.
        client : distributed.Client, optional
            An existing client to run on.

        Raises
        ------
        ConfigurationError
            An unknown scheduler or a bad option (before any work), an
            unreachable cluster, workers that do not see the files.
        """
        if isinstance(scheduler, Executor):
            if options:
                raise ConfigurationError(f"options go to get_executor, not to execute with an "
                                         f"executor: {', '.join(sorted(options))}")
            executor = scheduler
        else:
            executor = get_executor(scheduler, **options)
        pending, done = self._still_pending()
        skipped = [Record(p.name, "skipped", reason=c.reason, output=p.output) for p, c in done]
        start = time.perf_counter()
        folders = {_folder(p.output) for p in pending}
        folders |= {os.path.join(f, RECORD_FOLDER) for f in folders}  # and the records'
        for folder in folders:
            # A killed run's temporaries go now; one a live writer holds, never.
            remove_stale_temporaries(folder)
        records, dashboard = [], None
        try:
            if pending:  # else nothing starts: no pool, no fork server, no cluster
                records, dashboard = executor.execute(pending, self._merge_args)
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
                      executor.name, dashboard)

    def to_bag(self, *, partition_size: int | None = None) -> dask.bag.Bag:
        """The lazy ``dask.bag`` of the records that :meth:`execute` computes.

        One record per pending pair, as a dict with the keys of the JSON
        report's ``pairs`` (:meth:`Record.to_dict <dask_merge.Record.to_dict>`),
        made by the same tasks, named ``merge-pair`` on the dashboard, in
        the order of those tasks (:meth:`execute` sorts the records back
        into the plan's order).
        Computing the bag merges the pairs and checkpoints each, as
        :meth:`execute` does.  Compose it with your own graph:
        ``plan.to_bag().filter(...)``, ``.to_dataframe()``, ``client.compute``.

        What :meth:`execute` does and computing this bag does not:

        - no crash isolation: a pair that kills its worker fails its task
          (and the compute) as any task would, with the scheduler's own
          retries (``allowed-failures`` on a cluster); :meth:`execute`'s
          pool and cluster executors find that pair, fail it alone and
          merge the pairs that shared its task;
        - no re-check of the checkpoints: the bag merges the pairs pending
          when the plan was made, with no record of those planned done;
        - no removal of temporaries that killed runs left behind.

        Parameters
        ----------
        partition_size
            Pairs per task; by default cut as :meth:`execute` cuts them for
            this machine's cores.

        Examples
        --------
        >>> bag = dask_merge.plan("features/", output_dir="merged/").to_bag()  # doctest: +SKIP
        >>> bag.filter(is_failed).compute(scheduler="processes")  # doctest: +SKIP
        """
        from .executors import _partitions, check_count
        from .executors.graph import merge_bag

        check_count("partition_size", partition_size, least=1, optional=True)
        partitions = _partitions(self.pending, partition_size, os.cpu_count() or 1)
        return merge_bag(partitions, self._merge_args, as_dicts=True)

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
                f"{len(self.unpaired)} without a partner -> {self._outputs}>")

    @property
    def _outputs(self) -> str:
        """Where the outputs go, for people."""
        return self.output_dir if self.output_dir is not None else "several folders"

    def _repr_html_(self) -> str:
        rows = [(p.name, "pending", "") for p in self.pending]
        rows += [(p.name, "checkpointed", c.reason) for p, c in self.done]
        rows += [(os.path.basename(u), "no partner", u) for u in self.unpaired]
        return _html_table(
            f"<b>dask_merge plan</b>: {len(self.pending)} pending, {len(self.done)} checkpointed, "
            f"{len(self.unpaired)} without a partner; outputs in {_html(self._outputs)}",
            ("pair", "state", "why"), rows)


def plan(
    nucleotide_dir: str | os.PathLike[str],
    protein_dir: ProteinSpec | None = None,
    output_dir: str | os.PathLike[str] | None = None,
    *,
    label: str | int | None = None,
    force: bool = False,
    max_dropped: float | None = None,
    nucleotide_suffix: str = NUCLEOTIDE_SUFFIX,
    protein_suffix: str = PROTEIN_SUFFIX,
) -> Plan:
    """Find the pairs and which of them are already merged.

    Parameters
    ----------
    nucleotide_dir, protein_dir, output_dir
        As for :func:`~dask_merge.find_pairs`: ``protein_dir`` is the folder of
        the ``STEM_ESM.pt`` files, or the HDF5 file that VirNucPro v2 writes
        (``"esm/embeddings.h5"``), or a list of its shards; each
        ``STEM_DNABERT_S.pt`` is then merged with its rows there.
    nucleotide_suffix, protein_suffix
        As for :func:`~dask_merge.find_pairs`: the ends of the file names
        paired by what comes before them.
    label
        The training label stored in each output: ``"viral"`` (1),
        ``"host"`` (0), an int, or None for none.
    force
        Merge every pair again, checkpointed or not.
    max_dropped
        As for :func:`~dask_merge.merge_pair`.

    Raises
    ------
    ConfigurationError
        A missing folder or HDF5 file, an output folder that cannot be
        written, no pairs, a bad label, suffix or ``max_dropped``.
    """
    labels = _check_plan_options(label, force, max_dropped)
    try:
        found = find_pairs(nucleotide_dir, protein_dir, output_dir,
                           nucleotide_suffix=nucleotide_suffix, protein_suffix=protein_suffix)
    except FileNotFoundError as err:
        raise ConfigurationError(str(err)) from None
    output_dir = os.fspath(output_dir if output_dir is not None else nucleotide_dir)
    if not found.pairs:
        raise ConfigurationError(no_pairs_message(nucleotide_dir, protein_dir,
                                                  nucleotide_suffix, protein_suffix))
    return _plan(found.pairs, found.unpaired, output_dir, labels, force, max_dropped)


def plan_pairs(
    pairs: Iterable,
    output_dir: str | os.PathLike[str] | None = None,
    *,
    label: str | int | None = None,
    force: bool = False,
    max_dropped: float | None = None,
) -> Plan:
    """Plan the merge of explicit pairs, however their files are named.

    Parameters
    ----------
    pairs
        ``(nucleotide_path, protein_path)`` or ``(nucleotide_path,
        protein_path, output_path)`` tuples, in any iterable.  A pair without
        an output writes ``output_dir/NAME_merged.pt``, NAME being the
        nucleotide file's name without ``.pt`` and without a trailing
        ``_DNABERT_S`` (:func:`~dask_merge.pairs.output_name`), as in
        folder mode.  A pair's name in the plan and report is its output's
        stem (:func:`~dask_merge.pairs.pair_name`).
    output_dir
        Where the outputs of pairs without one go.
    label, force, max_dropped
        As for :func:`plan`.

    Raises
    ------
    ConfigurationError
        Before any work: a pair that is not such a tuple, a missing input,
        a pair without output and no ``output_dir``, two pairs that write
        one output, an output that is an input, an output folder that
        cannot be written, a bad label or ``max_dropped``.

    Examples
    --------
    >>> job = plan_pairs([("a/file_0_DNABERT.pt", "b/file_0_ESM.pt")],
    ...                  "merged/")  # doctest: +SKIP
    >>> job.pending[0].output  # doctest: +SKIP
    'merged/file_0_DNABERT_merged.pt'
    """
    labels = _check_plan_options(label, force, max_dropped)
    built = build_pairs(pairs, output_dir)
    return _plan(built, [], None if output_dir is None else os.fspath(output_dir), labels, force,
                 max_dropped)


def _check_plan_options(label: str | int | None, force: bool,
                        max_dropped: float | None) -> list[int] | None:
    """The label as stored (``label_value``), once the options are checked."""
    if type(force) is not bool:
        raise ConfigurationError(f"force must be True or False, not {force!r}")
    try:
        check_max_dropped(max_dropped)
        return label_value(label)
    except ValueError as err:
        raise ConfigurationError(str(err)) from None


def _plan(pairs: list[Pair], unpaired: list[str], output_dir: str | None,
          labels: list[int] | None, force: bool, max_dropped: float | None) -> Plan:
    """What :func:`plan` and :func:`plan_pairs` share: the output folders, the checkpoints.

    Without ``output_dir``, the plan's is the outputs' folder if they share one.
    """
    folders = list(dict.fromkeys(_folder(pair.output) for pair in pairs))
    for folder in folders:
        _check_output_folder(folder)
    if output_dir is None and len(folders) == 1:
        output_dir = folders[0]
    pending, done = _by_checkpoint(pairs, labels, force=force)
    return Plan(pending, done, unpaired, labels, output_dir, force, max_dropped)


def _folder(path: str) -> str:
    """The folder of ``path``, ``.`` for a bare file name (``os.scandir("")`` fails)."""
    return os.path.dirname(path) or "."


def _check_output_folder(output_dir: str) -> None:
    try:
        os.makedirs(output_dir, exist_ok=True)
    except OSError as err:
        raise ConfigurationError(f"cannot create output folder {output_dir} ({err.strerror})") from None
    if not os.access(output_dir, os.W_OK | os.X_OK):
        raise ConfigurationError(f"output folder {output_dir} is not writable")
    records = os.path.join(output_dir, RECORD_FOLDER)
    if os.path.lexists(records) and not os.path.isdir(records):
        raise ConfigurationError(f"{records} is not a folder: the checkpoint records go there")


def _by_checkpoint(pairs: list[Pair], labels: list[int] | None, *, force: bool = False
                   ) -> tuple[list[Pair], list[tuple[Pair, Checkpoint]]]:
    """The pairs to merge, and those done with why (see :func:`checkpoint_state`)."""
    pending, done = [], []
    for pair in pairs:
        state = labelled_checkpoint_state(pair, labels, force=force)
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
    nucleotide_suffix: str = NUCLEOTIDE_SUFFIX,
    protein_suffix: str = PROTEIN_SUFFIX,
    **options,
) -> Report:
    """Plan and execute in one call: ``plan(...).execute(**options)``.

    Unknown options and bad values fail before planning creates the output folder.
    """
    accepted = inspect.signature(get_executor).parameters
    planning = [name for name, p in inspect.signature(plan).parameters.items()
                if p.kind is p.KEYWORD_ONLY]
    for name in options.keys() - accepted.keys():
        close = difflib.get_close_matches(name, [*accepted, *planning], 1)
        raise TypeError(f"run() got an unexpected option {name!r}"
                        + (f"; did you mean {close[0]!r}?" if close else ""))
    executor = get_executor(**options)
    return plan(nucleotide_dir, protein_dir, output_dir, label=label, force=force,
                max_dropped=max_dropped, nucleotide_suffix=nucleotide_suffix,
                protein_suffix=protein_suffix).execute(executor)
