"""How the pending pairs are cut into tasks: by the bytes each pair holds.

Pure functions, no Dask and no file system: the caller gives each pair's
input size (in bytes) and the number of worker threads.

The cost of merging a pair grows with its bytes (a 10,000-row pair reads
168 MB and takes about half a second) plus a small fixed part (open, fsync,
rename, checkpoint record; about a millisecond).  Thousands of tiny pairs
are batched, since a task costs about what a tiny pair does to schedule;
a pair bigger than a task's share of the work runs alone.  Tasks are
returned biggest first, so that the last to start are short and the
workers finish together.

>>> MiB = 2**20
>>> partition(["big", "t1", "t2", "t3", "t4"], [160 * MiB, MiB, MiB, MiB, MiB], threads=1)
[['big'], ['t1', 't2', 't3', 't4']]
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TypeVar

T = TypeVar("T")

TARGET_TASK_BYTES = 32 * 2**20
"""Batch tiny pairs up to about this much input per task."""
TASKS_PER_THREAD = 4
"""At least this many tasks per worker thread, so that the workers finish together."""
PAIR_OVERHEAD_BYTES = 128 * 2**10
"""A pair's fixed cost (open, fsync, rename, record) as the bytes the kernel reads meanwhile."""


def pair_cost(size: int) -> int:
    """What a pair of ``size`` input bytes weighs when tasks are balanced.

    >>> pair_cost(0), pair_cost(2**20)
    (131072, 1179648)
    """
    return max(size, 0) + PAIR_OVERHEAD_BYTES


def partition(
    pairs: Sequence[T],
    sizes: Sequence[int],
    *,
    threads: int,
    pairs_per_task: int | None = None,
    target_bytes: int = TARGET_TASK_BYTES,
) -> list[list[T]]:
    """Cut ``pairs`` into tasks of about equal cost; the costliest first.

    Parameters
    ----------
    pairs
        The pairs, in the order their outputs are reported.
    sizes
        Each pair's input bytes (0 when unknown), in the same order.
    threads
        Worker threads that will run the tasks.
    pairs_per_task
        Cut into tasks of this many consecutive pairs instead
        (``--partition-size``).
    target_bytes
        About the most input a batch of small pairs holds.

    Returns
    -------
    list of list
        Every pair exactly once.  A task's pairs keep their order; tasks are
        sorted by cost, descending (ties in plan order).

    Notes
    -----
    The share of a task is the total cost over ``max(TASKS_PER_THREAD *
    threads, total / target_bytes)`` tasks, rounded up to a multiple of the
    threads.  A pair costing at least that share runs alone; the others are
    cut, in order, into runs of about equal cost that are each at most one
    share and one pair.

    Examples
    --------
    >>> partition(list("abcdefgh"), [10] * 8, threads=2)
    [['a'], ['b'], ['c'], ['d'], ['e'], ['f'], ['g'], ['h']]
    >>> partition(list("abcdefgh"), [1, 1, 1, 1, 1, 1, 900_000, 1], threads=1)
    [['g'], ['a', 'b', 'c', 'd'], ['e', 'f', 'h']]
    >>> partition(list("abcde"), [5, 0, 0, 0, 9 * 2**20], threads=2, pairs_per_task=2)
    [['e'], ['a', 'b'], ['c', 'd']]
    """
    if len(pairs) != len(sizes):
        raise ValueError(f"{len(pairs)} pairs but {len(sizes)} sizes")
    if threads < 1:
        raise ValueError(f"threads must be at least 1, not {threads!r}")
    costs = [pair_cost(s) for s in sizes]
    if pairs_per_task is not None:
        step = max(int(pairs_per_task), 1)
        cuts = list(range(0, len(pairs), step)) + [len(pairs)]
        return _biggest_first(pairs, costs, [range(a, b) for a, b in zip(cuts, cuts[1:])])
    share = task_share(costs, threads=threads, target_bytes=target_bytes)
    alone = [range(i, i + 1) for i, c in enumerate(costs) if c >= share]
    small = [i for i, c in enumerate(costs) if c < share]
    return _biggest_first(pairs, costs, alone + _even_runs(small, costs, share))


def task_share(costs: Sequence[int], *, threads: int,
               target_bytes: int = TARGET_TASK_BYTES) -> float:
    """The cost one task should hold: the total over the number of tasks wanted.

    >>> task_share([100] * 10, threads=2, target_bytes=10**6)
    125.0
    >>> task_share([2**20] * 512, threads=2, target_bytes=32 * 2**20) / 2**20
    32.0
    """
    total = sum(costs)
    tasks = max(TASKS_PER_THREAD * threads, math.ceil(total / target_bytes))
    tasks = -(-tasks // threads) * threads  # a multiple of the threads
    return total / tasks if total else 1.0


def _even_runs(indices: list[int], costs: Sequence[int], share: float) -> list[list[int]]:
    """Cut ``indices`` (in order) into runs of about equal cost, none much above ``share``.

    A run ends at the pair whose end lies nearest its cumulative boundary, so
    each holds at most its part of the total plus one pair.

    >>> _even_runs([0, 1, 2, 3, 4, 5], [1] * 6, 2.0)
    [[0, 1], [2, 3], [4, 5]]
    >>> _even_runs([0, 1, 2], [5, 1, 1], 10.0)
    [[0, 1, 2]]
    """
    if not indices:
        return []
    total = sum(costs[i] for i in indices)
    runs = max(1, math.ceil(total / share - 1e-9))
    part = total / runs
    cut: list[list[int]] = [[]]
    done = 0.0
    for i in indices:
        boundary = part * len(cut)
        # Close the run before ``i`` when that end is nearer its boundary than ``i``'s end.
        if cut[-1] and len(cut) < runs and boundary - done < done + costs[i] - boundary:
            cut.append([])
        cut[-1].append(i)
        done += costs[i]
    return cut


def _biggest_first(pairs: Sequence[T], costs: Sequence[int], groups) -> list[list[T]]:
    weighed = [(sum(costs[i] for i in g), min(g, default=0), list(g)) for g in groups if len(g)]
    weighed.sort(key=lambda t: (-t[0], t[1]))
    return [[pairs[i] for i in g] for _, _, g in weighed]
