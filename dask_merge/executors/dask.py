"""A Dask cluster: a :class:`distributed.LocalCluster` started here, or an existing one.

Workers send back one small record per pair, never tensors: each task
writes its own output.  A task whose worker dies is retried by the
scheduler; one that killed every worker that ran it (``KilledWorker``)
holds a culprit, found among its pairs by
:func:`~dask_merge.executors.isolate`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import time
import urllib.parse
import warnings
from collections.abc import Iterator

from ..errors import ConfigurationError
from ..pairs import Pair
from ..sources import spec_paths
from ..tasks import Record, crashed, keep_read_buffers
from . import Died, Executor, Session, isolate

CONNECT_TIMEOUT = 5  # seconds to reach a scheduler, or for its file to appear


class DaskExecutor(Executor):
    """Runs on a Dask cluster, reached by ``client``, ``scheduler_file`` or an address.

    ``scheduler="local"`` starts a :class:`distributed.LocalCluster` of
    ``workers`` processes, with its dashboard at ``dashboard_address``, and
    closes it at the end.  On an existing cluster, tasks are cut for its
    worker threads (``workers`` only when it has none yet).
    """

    def __init__(self, scheduler: str = "local", *, scheduler_file: str | None = None,
                 client=None, dashboard_address: str = "127.0.0.1:8787",
                 performance_report: str | None = None, **options) -> None:
        super().__init__(**options)
        if client is not None:
            from distributed import Client

            if not isinstance(client, Client):
                raise ConfigurationError(
                    f"client must be a distributed.Client, not a {type(client).__name__}")
        self.scheduler, self.scheduler_file, self.client = scheduler, scheduler_file, client
        self.dashboard_address = dashboard_address
        self.performance_report = performance_report
        self.name = "cluster" if client is not None or scheduler_file else scheduler

    @contextlib.contextmanager
    def started(self) -> Iterator[Session]:
        with self._client() as client:
            dashboard = client.dashboard_link
            if dashboard:  # with or without progress bars: where to watch the run
                print(f"dask-merge: dashboard at {dashboard}"
                      f"{_port_note(dashboard, self.scheduler, self.dashboard_address)}",
                      file=sys.stderr)
            # Tasks for the threads the cluster has, not for this machine's cores.
            threads = sum(client.nthreads().values()) or self.workers
            yield Session(threads, lambda partitions, merge_args: self._run(client, partitions, merge_args),
                          dashboard, client)

    @contextlib.contextmanager
    def _client(self) -> Iterator:
        import dask
        from distributed import Client, LocalCluster

        if self.client is not None:
            yield self.client
            return
        if self.scheduler == "local" and not self.scheduler_file:
            # A task whose worker dies is tried again on another, `retries` times
            # (on an existing cluster, its own allowed-failures setting rules).
            # One task at a time per worker: a dying worker takes down only the
            # pair it runs, never an innocent one queued behind it.
            with dask.config.set({"distributed.scheduler.allowed-failures": self.retries,
                                  "distributed.scheduler.worker-saturation": 1.0}), \
                    _quiet_dashboard(), LocalCluster(n_workers=self.workers, threads_per_worker=1, processes=True,
                                 host="127.0.0.1", dashboard_address=self.dashboard_address
                                 ) as cluster, Client(cluster) as local:
                local.run(keep_read_buffers)  # its workers live for this run only
                yield local
            return
        if self.scheduler_file:
            _wait_for_file(self.scheduler_file)  # distributed would wait for it forever
            target = {"scheduler_file": self.scheduler_file}
        else:
            target = {"address": self.scheduler}
        try:
            remote = Client(**target, timeout=f"{CONNECT_TIMEOUT}s")
        except (OSError, TimeoutError, ValueError, KeyError, AssertionError) as err:
            # KeyError, AssertionError: a scheduler file without the scheduler's address
            where = self.scheduler_file or self.scheduler
            raise ConfigurationError(f"cannot reach a Dask scheduler at {where}: {err}") from None
        with remote:
            yield remote

    def _run(self, client, partitions: list[list[Pair]], merge_args: tuple) -> list[Record]:
        from distributed import performance_report

        _check_workers_see(client, partitions[0][0])
        report = (performance_report(filename=self.performance_report) if self.performance_report
                  else contextlib.nullcontext())
        with report:
            records, died = _compute(client, partitions, merge_args, self.retries, self.progress)

            def alone(pairs: list[Pair]) -> tuple[list[Record], Died]:
                more, again = _compute(client, [[p] for p in pairs], merge_args, self.retries,
                                       self.progress)
                return more, {part[0]: why for part, why in again}

            # The scheduler retried each task already: a lone pair that died is the culprit.
            records += isolate(died, alone, tries_alone=1, tries_culprit=0)
        return records


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
    deadline = time.monotonic() + CONNECT_TIMEOUT
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise ConfigurationError(f"scheduler file {path} does not exist "
                                     f"(waited {CONNECT_TIMEOUT}s for a scheduler to write it)")
        time.sleep(0.1)


def _paths_unseen(paths: list[str]) -> list[str]:
    """Run on a worker: which of ``paths`` it cannot see."""
    return [p for p in paths if not os.path.exists(p)]


def _check_workers_see(client, pair: Pair) -> None:
    """Refuse a cluster whose workers do not see a pair's files where the client does."""
    missing = client.submit(_paths_unseen, [pair.nucleotide, *spec_paths(pair.protein),
                                            os.path.dirname(pair.output)], pure=False).result()
    if missing:
        raise ConfigurationError(
            f"a Dask worker cannot see {missing[0]}: workers must see the same paths as the "
            "client (a shared file system, mounted at the same place)"
        )


def _compute(client, partitions, merge_args, retries: int, progress: bool
             ) -> tuple[list[Record], list[tuple[list[Pair], str]]]:
    """Compute the bag on the cluster.

    Returns the records and the partitions whose task killed every worker
    that ran it (``KilledWorker``), each with why.
    """
    from distributed import KilledWorker, as_completed

    from .graph import merge_bag
    from .progress import show_progress

    futures = client.compute(merge_bag(partitions, merge_args).to_delayed(), retries=retries)
    index = {f.key: i for i, f in enumerate(futures)}
    shown = show_progress(client, futures) if progress else None
    records: list[Record] = []
    died = []
    # Waiting on futures blocks on a lock, not on the event loop: the
    # client's IO loop (its own thread) keeps running, and with it the widget.
    for future in as_completed(futures):
        try:
            records += future.result()
        except KilledWorker as err:
            why = f"the Dask worker died while merging ({type(err).__name__}: {err})"
            died.append((partitions[index[future.key]], why))
        except Exception as err:  # not the pairs' doing: the worker's environment
            why = f"the Dask task failed ({type(err).__name__}: {err})"
            records += crashed(partitions[index[future.key]], why)
    if shown is not None:
        shown.finish()
    return records, died
