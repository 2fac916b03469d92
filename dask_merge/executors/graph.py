"""The Dask graph every executor computes, and Dask's local schedulers.

Imported by an executor when it starts, never before: it imports Dask
(its bag module, which imports fsspec, only when a bag is made: ``check``
needs the schedulers alone).
"""

from __future__ import annotations

import contextlib
import sys
from typing import TYPE_CHECKING

import dask.local
import dask.multiprocessing
import dask.threaded
from dask.base import tokenize

from ..pairs import Pair
from ..tasks import merge_pairs, records_as_dicts
from . import TASK_NAME

if TYPE_CHECKING:
    import dask.bag as db


# Dask's local schedulers as functions: given by name, ``compute`` first imports
# distributed to look for a default client, 0.2 s of every run.
LOCAL_SCHEDULERS = {
    "processes": dask.multiprocessing.get,
    "threads": dask.threaded.get,
    "sync": dask.local.get_sync,
}


def merge_bag(partitions: list[list[Pair]], merge_args: tuple, *,
              as_dicts: bool = False) -> db.Bag:
    """A bag with one task per partition, :func:`~dask_merge.tasks.merge_pairs` of its pairs and ``merge_args``.

    The pairs are the tasks' arguments, not keys of their own: the dashboard
    and the progress widget count ``merge-pair`` tasks only.  ``as_dicts``:
    each task turns its records into dicts itself (a task within the task),
    so that a bag for users holds plain data under the same task names.
    """
    import dask.bag as db

    # Plain tuples: Dask walks a namedtuple argument to rebuild it (40 ms for
    # 2,000 pairs); merge_pairs makes Pairs again.
    batches = [tuple(map(tuple, part)) for part in partitions]
    # Named after the outputs and the cut, hashed as one string: tokenizing
    # the nested tuples costs 30 ms per 2,000 pairs.
    outputs = "\n".join(pair.output for part in partitions for pair in part)
    # as_dicts is in the name: a cluster must never hand one bag's results to the other.
    name = f"{TASK_NAME}-{tokenize(outputs, [len(b) for b in batches], merge_args, as_dicts)}"
    graph = {(name, i): (records_as_dicts, (merge_pairs, batch, *merge_args)) if as_dicts
             else (merge_pairs, batch, *merge_args) for i, batch in enumerate(batches)}
    return db.Bag(graph, name, len(partitions))


def progress_bar(progress: bool) -> contextlib.AbstractContextManager:
    """Dask's text progress bar of the local schedulers, or nothing."""
    from dask.diagnostics import ProgressBar

    return ProgressBar(out=sys.stderr) if progress else contextlib.nullcontext()
