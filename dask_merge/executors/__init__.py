"""Executors: how the pending pairs of a plan are run, one module each.

======================================  ===============================  ==============
``scheduler=``                          executor                         module
======================================  ===============================  ==============
``"sync"``, ``"threads"``               :class:`PythonExecutor`          ``python.py``
``"processes"`` (the default)           :class:`PoolExecutor`            ``pool.py``
``"local"``, an address,                :class:`DaskExecutor`            ``dask.py``
``scheduler_file=`` or ``client=``
======================================  ===============================  ==============

:func:`get_executor` looks an executor up by name and makes it, which checks
its options: a bad option fails before planning creates anything.
:meth:`Executor.execute` cuts the pairs into tasks and maps
:func:`~dask_merge.tasks.merge_pairs` over them.  An executor adds one
method, :meth:`Executor.started`.  Importing this module (or an executor's)
imports no Dask: an executor imports it when it starts, so that the pool
starts its fork server first, and a run with nothing pending imports and
starts nothing.

>>> get_executor("processes", workers=2)
<PoolExecutor processes, 2 workers>
>>> get_executor("thread")
Traceback (most recent call last):
dask_merge.errors.ConfigurationError: unknown scheduler 'thread': processes, threads, sync, local or an address such as tcp://host:8786
"""

from __future__ import annotations

import abc
import contextlib
import importlib
import numbers
import os
from collections.abc import Callable
from dataclasses import dataclass

from ..errors import ConfigurationError
from ..pairs import Pair
from ..partition import partition
from ..tasks import Record, crashed

TASK_NAME = "merge-pair"  # what tasks are called on the dashboard

Died = dict[Pair, str]  # why its worker died under each pair that killed it


@dataclass
class Session:
    """A started executor: how many tasks it runs at once, and how to run them."""

    threads: int
    run: Callable[[list[list[Pair]], tuple], list[Record]]
    dashboard: str | None = None
    client: object = None  # on a cluster: its distributed.Client


class Executor(abc.ABC):
    """Runs batches of pairs, one task per batch; one record per pair comes back.

    Parameters
    ----------
    workers
        Worker processes (or threads); default: the number of cores.
    retries
        How often a pair whose worker died is tried again before it fails.
    partition_size
        Pairs per task; by default chosen from the pairs' sizes.
    progress
        Draw a progress bar (a widget in notebooks).
    """

    name: str  # what the report says the run was on

    def __init__(self, *, workers: int | None = None, retries: int = 1,
                 partition_size: int | None = None, progress: bool = True) -> None:
        for option, value, least, optional in (("workers", workers, 1, True),
                                               ("partition_size", partition_size, 1, True),
                                               ("retries", retries, 0, False)):
            check_count(option, value, least=least, optional=optional)
        if type(progress) is not bool:
            raise ConfigurationError(f"progress must be True or False, not {progress!r}")
        # numpy's ints pass the check; distributed asserts Python ints.
        self.workers = int(workers) if workers is not None else (os.cpu_count() or 1)
        self.retries = int(retries)
        self.partition_size = None if partition_size is None else int(partition_size)
        self.progress = progress

    def execute(self, pending: list[Pair], merge_args: tuple) -> tuple[list[Record], str | None]:
        """Merge ``pending`` (not empty) with :func:`~dask_merge.tasks.merge_pairs` ``(pairs, *merge_args)``;
        return the records, in any order, and the dashboard link."""
        with self.started() as session:
            partitions = _partitions(pending, self.partition_size, session.threads)
            return session.run(partitions, merge_args), session.dashboard

    @abc.abstractmethod
    def started(self) -> contextlib.AbstractContextManager[Session]:
        """Start what runs the tasks (a pool, a cluster's client); stop it on leaving."""

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name}, {self.workers} workers>"


def check_count(option: str, value: object, *, least: int, optional: bool) -> None:
    """Refuse an option that is not an int of at least ``least`` (or None, if ``optional``).

    >>> check_count("partition_size", 0, least=1, optional=True)
    Traceback (most recent call last):
    dask_merge.errors.ConfigurationError: partition_size must be an int of at least 1 (or None), not 0
    """
    if not (value is None and optional or (  # numpy's ints are Integral too
            isinstance(value, numbers.Integral) and not isinstance(value, bool)
            and value >= least)):
        raise ConfigurationError(f"{option} must be an int of at least {least}"
                                 f"{' (or None)' if optional else ''}, not {value!r}")


def no_cluster_options(*, performance_report: str | None) -> None:
    """Refuse what only a cluster does; the local executors call this."""
    if performance_report is not None:
        raise ConfigurationError("a performance report needs a cluster: scheduler 'local', an "
                                 "address, scheduler_file or client")


# name -> (module, class); "dask" also takes an address, scheduler_file or client
_EXECUTORS = {
    "sync": ("python", "PythonExecutor"),
    "threads": ("python", "PythonExecutor"),
    "processes": ("pool", "PoolExecutor"),
    "local": ("dask", "DaskExecutor"),
}


def get_executor(
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
) -> Executor:
    """The executor of a scheduler name, made with its options (see :meth:`Plan.execute`).

    Raises
    ------
    ConfigurationError
        An unknown scheduler, or an option it cannot run with; the message names it.
    """
    common = {"workers": workers, "retries": retries, "partition_size": partition_size,
              "progress": progress}
    on_a_cluster = client is not None or bool(scheduler_file)
    if on_a_cluster or isinstance(scheduler, str) and ":" in scheduler:
        module, cls = "dask", "DaskExecutor"
    elif isinstance(scheduler, str) and scheduler in _EXECUTORS:
        module, cls = _EXECUTORS[scheduler]
    else:
        raise ConfigurationError(f"unknown scheduler {scheduler!r}: processes, threads, sync, "
                                 "local or an address such as tcp://host:8786")
    executor = getattr(importlib.import_module(f".{module}", __name__), cls)
    if module == "dask":
        return executor(scheduler, scheduler_file=scheduler_file, client=client,
                        dashboard_address=dashboard_address,
                        performance_report=performance_report, **common)
    return executor(scheduler, performance_report=performance_report, **common)


# --- what the pool and a cluster share: finding which pair killed a worker ---------


def isolate(groups: list[tuple[list[Pair], str]], run_alone: Callable[[list[Pair]], tuple[list[Record], Died]],
            *, tries_alone: int, tries_culprit: int) -> list[Record]:
    """Find the pairs that kill their worker; merge the others; one record each.

    Each group holds the pairs of the tasks running when a worker died, and
    why it died: one of them killed it.  Each pair runs alone then, so that
    the culprit is found and fails, and no innocent pair is blamed.  A group
    of one pair is its culprit: it has ``tries_culprit`` tries left (none,
    when the executor retried it already); a pair of a larger group has
    ``tries_alone`` (at least one, to tell it from the culprit).

    ``run_alone(pairs)`` runs each of ``pairs`` once in a task of its own;
    it returns the records of those that ended and, for each that killed
    its worker again, why.
    """
    tries: dict[Pair, int] = {}
    why: dict[Pair, str] = {}
    for pairs, reason in groups:
        for pair in pairs:
            tries[pair] = tries_culprit if len(pairs) == 1 else tries_alone
            why[pair] = reason
    records: list[Record] = []
    while tries:
        records += [r for pair, left in tries.items() if not left for r in crashed([pair], why[pair])]
        tries = {pair: left for pair, left in tries.items() if left}
        if not tries:
            break
        finished, died = run_alone(list(tries))
        records += finished
        why.update(died)
        tries = {pair: tries[pair] - 1 for pair in died}
    return records


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


def __getattr__(name: str):
    """The executor classes, imported on first use (their modules import no Dask either)."""
    for module, cls in _EXECUTORS.values():
        if name == cls:
            return getattr(importlib.import_module(f".{module}", __name__), cls)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["DaskExecutor", "Executor", "PoolExecutor", "PythonExecutor", "Session",
           "get_executor", "isolate"]
