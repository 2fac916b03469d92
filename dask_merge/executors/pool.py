"""The default executor: Dask's processes scheduler on a pool that survives dying workers.

The pool's processes are forked from a clean fork server
(:func:`~dask_merge._worker_main.pool_context`): they hold Dask's core and
the kernel, not distributed or torch, nor anything of the parent's
``__main__`` script.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

from .._worker_main import pool_context
from ..pairs import Pair
from ..tasks import Record, pool_worker
from . import Died, Executor, Session, isolate, no_cluster_options


class PoolExecutor(Executor):
    """A pool of ``workers`` processes; a pair that kills its worker fails alone.

    A dead child breaks the whole pool (``BrokenProcessPool``).  The tasks
    that had finished keep their records; those that had not started run in
    a fresh pool; those running when it broke are suspects, each of their
    pairs retried alone in a pool of its own (:func:`~dask_merge.executors.isolate`).

    >>> PoolExecutor(workers=3)
    <PoolExecutor processes, 3 workers>
    """

    name = "processes"

    def __init__(self, scheduler: str = "processes", *, performance_report: str | None = None,
                 **options) -> None:
        super().__init__(**options)
        no_cluster_options(performance_report=performance_report)

    @contextlib.contextmanager
    def started(self) -> Iterator[Session]:
        # The fork server starts here, before this process imports Dask
        # (which its ~0.2 s of imports then overlap), and only for a run with
        # something to merge; `dask-merge check` starts it earlier still.
        pool_context()
        yield Session(self.workers, self._run)

    def _run(self, partitions: list[list[Pair]], merge_args: tuple) -> list[Record]:
        records: list[Record] = []
        remaining = list(partitions)
        while remaining:
            finished, running, broken = _compute_in_pool(remaining, merge_args, self.workers,
                                                         self.progress)
            records += [r for part in finished.values() for r in part]
            if not broken:
                break
            suspects = [pair for i in sorted(running) for pair in remaining[i]]
            why = "the worker process died while merging: crashed or killed (out of memory?)"
            records += isolate([(suspects, why)], lambda pairs: self._alone(pairs, merge_args),
                               tries_alone=max(self.retries, 1), tries_culprit=self.retries)
            remaining = [p for i, p in enumerate(remaining) if i not in finished and i not in running]
        return records

    def _alone(self, pairs: list[Pair], merge_args: tuple) -> tuple[list[Record], Died]:
        """Each pair in a pool of its own, one after another: a broken pool names its pair."""
        records: list[Record] = []
        died: Died = {}
        for pair in pairs:
            finished, _, broken = _compute_in_pool([[pair]], merge_args, 1, self.progress)
            if broken:
                died[pair] = (f"the worker process died while merging {pair.name}: "
                              "crashed or killed (out of memory?)")
            else:
                records += finished[0]
        return records, died


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
    import dask
    from dask.callbacks import Callback

    from .graph import LOCAL_SCHEDULERS, merge_bag, progress_bar

    bag = merge_bag(partitions, merge_args)
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
        with Callback(pretask=pretask, posttask=posttask), progress_bar(progress):
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
