"""Dask's local schedulers in this process: ``threads``, or ``sync`` (a plain loop, for pdb)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from ..pairs import Pair
from ..tasks import Record
from . import Executor, Session, no_cluster_options


class PythonExecutor(Executor):
    """One process: a pool of ``workers`` threads, or one thread (``sync``).

    A pair that kills its worker kills this process: nothing to recover.

    >>> PythonExecutor("sync", workers=1)
    <PythonExecutor sync, 1 workers>
    """

    def __init__(self, scheduler: str = "threads", *, performance_report: str | None = None,
                 **options) -> None:
        super().__init__(**options)
        no_cluster_options(performance_report=performance_report)
        self.name = scheduler

    @contextlib.contextmanager
    def started(self) -> Iterator[Session]:
        yield Session(self.workers, self._run)

    def _run(self, partitions: list[list[Pair]], merge_args: tuple) -> list[Record]:
        import dask

        from .graph import LOCAL_SCHEDULERS, merge_bag, progress_bar

        with progress_bar(self.progress):
            parts = merge_bag(partitions, merge_args).to_delayed()
            results = dask.compute(*parts, scheduler=LOCAL_SCHEDULERS[self.name],
                                   num_workers=self.workers)
        return [record for part in results for record in part]
