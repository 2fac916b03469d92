"""Tasks balanced by bytes: dask_merge.partition, and the executors' use of it."""

from __future__ import annotations

import math
import os

import dask.order
import pytest
from dask.callbacks import Callback
from hypothesis import given, settings
from hypothesis import strategies as st

import dask_merge
from dask_merge.executors import TASK_NAME, _partitions, _run_order
from dask_merge.partition import PAIR_OVERHEAD_BYTES, pair_cost, partition, task_share
from dask_merge.pairs import Pair
from dask_merge.testing import make_pair

TINY = 170_000  # a 10-row pair at the real widths
BIG = 168_000_000  # a 10,000-row pair


def mixed(tiny: int, big: int, order: str) -> list[int]:
    """Sizes of ``tiny`` tiny and ``big`` big pairs, the big ones placed as ``order`` says."""
    if order == "big first":
        return [BIG] * big + [TINY] * tiny
    if order == "big last":
        return [TINY] * tiny + [BIG] * big
    if order == "spread":  # evenly among the tiny ones
        sizes = [TINY] * tiny
        for k in range(big):
            sizes.insert(k * (tiny + big) // big, BIG)
        return sizes
    assert order == "interleaved"  # alternating, the rest of the tiny ones at the end
    return [s for k in range(big) for s in (BIG, TINY)] + [TINY] * (tiny - big)


def task_costs(tasks: list[list[int]], sizes: list[int]) -> list[int]:
    return [sum(pair_cost(sizes[i]) for i in task) for task in tasks]


def makespan(costs: list[int], threads: int) -> int:
    """When the last worker finishes, each taking the next task as it gets free."""
    free = [0] * threads
    for cost in costs:
        k = free.index(min(free))
        free[k] += cost
    return max(free)


def check_invariants(tasks: list[list[int]], sizes: list[int], threads: int) -> None:
    """What every default cut holds to; ``tasks`` hold indices into ``sizes``."""
    assert sorted(i for task in tasks for i in task) == list(range(len(sizes)))
    assert all(task == sorted(task) for task in tasks)  # a task keeps the plan's order
    costs = task_costs(tasks, sizes)
    assert costs == sorted(costs, reverse=True)  # the costliest first
    share = task_share([pair_cost(s) for s in sizes], threads=threads)
    for task, cost in zip(tasks, costs):
        if len(task) > 1:  # a batch: only pairs below a share, and at most a share and a pair
            biggest = max(pair_cost(sizes[i]) for i in task)
            assert biggest < share
            assert cost <= share + biggest, (cost, share, biggest)


@pytest.mark.parametrize("threads", [1, 2, 64])
@pytest.mark.parametrize("order", ["big first", "big last", "spread", "interleaved"])
@pytest.mark.parametrize("tiny, big", [(200, 8), (1000, 40)])
def test_mixed_sizes_make_no_straggler(tiny, big, order, threads):
    sizes = mixed(tiny, big, order)
    tasks = partition(list(range(len(sizes))), sizes, threads=threads)
    check_invariants(tasks, sizes, threads)
    costs = task_costs(tasks, sizes)
    # Every big pair alone; the largest task is one big pair, not a batch of them.
    big_tasks = [task for task in tasks if any(sizes[i] == BIG for i in task)]
    assert len(big_tasks) == big and all(len(task) == 1 for task in big_tasks)
    assert max(costs) == pair_cost(BIG)
    # Tiny pairs batched into as few tasks as the shares allow, each near a share.
    share = task_share([pair_cost(s) for s in sizes], threads=threads)
    batches = costs[big:]
    assert len(batches) == math.ceil(tiny * pair_cost(TINY) / share)
    assert min(batches) >= sum(batches) / len(batches) - pair_cost(TINY)
    # Handed out as they come, the tasks end within 15% of the best possible.
    total = sum(costs)
    best = max(total / threads, pair_cost(BIG))
    assert makespan(costs, threads) <= 1.15 * best


def test_the_straggler_of_a_count_cut_is_gone():
    # 200 tiny pairs sorting before 8 big ones, on 2 threads: a cut by count
    # made 8 tasks, the last holding all 8 big pairs (93% of the bytes).
    sizes = mixed(200, 8, "big last")
    tasks = partition(list(range(208)), sizes, threads=2)
    shares = [c / sum(task_costs(tasks, sizes)) for c in task_costs(tasks, sizes)]
    assert max(shares) < 0.13  # one big pair: 1/8 of the big bytes
    assert makespan(task_costs(tasks, sizes), 2) <= 1.05 * sum(task_costs(tasks, sizes)) / 2


@pytest.mark.parametrize("pairs, threads", [(400, 2), (401, 3), (2000, 2), (7, 2)])
def test_pairs_of_one_size_make_tasks_of_one_size(pairs, threads):
    sizes = [TINY] * pairs
    tasks = partition(list(range(pairs)), sizes, threads=threads)
    check_invariants(tasks, sizes, threads)
    assert [i for task in sorted(tasks) for i in task] == list(range(pairs))  # runs, in order
    if pairs >= 4 * threads:
        assert len(tasks) % threads == 0 and len(tasks) >= 4 * threads
    else:
        assert len(tasks) == pairs
    assert max(map(len, tasks)) - min(map(len, tasks)) <= 1  # all end together


def test_tiny_pairs_are_batched_to_about_32_mib():
    sizes = [TINY] * 20_000  # 3.4 GB of input
    tasks = partition(list(range(len(sizes))), sizes, threads=2)
    per_task = [c / 2**20 for c in task_costs(tasks, sizes)]
    assert 28 <= min(per_task) and max(per_task) <= 32.5
    assert len(tasks) % 2 == 0


def test_pairs_per_task_cuts_runs_of_that_many():
    sizes = mixed(20, 3, "spread")
    tasks = partition(list(range(23)), sizes, threads=2, pairs_per_task=5)
    assert sorted(map(len, tasks)) == [3, 5, 5, 5, 5]
    assert sorted(tasks) == [list(range(a, min(a + 5, 23))) for a in range(0, 23, 5)]
    costs = task_costs(tasks, sizes)
    assert costs == sorted(costs, reverse=True)
    assert partition(list(range(5)), [0] * 5, threads=2, pairs_per_task=1) == [[0], [1], [2], [3], [4]]


def test_pairs_whose_size_is_unknown_still_spread():
    # An input gone since planning counts as 0 bytes: its pair costs only its overhead.
    tasks = partition(list(range(16)), [0] * 16, threads=2)
    assert len(tasks) == 8 and all(len(t) == 2 for t in tasks)
    assert pair_cost(-1) == PAIR_OVERHEAD_BYTES


def test_bad_arguments_are_refused_with_their_values():
    with pytest.raises(ValueError, match="3 pairs but 2 sizes"):
        partition([1, 2, 3], [1, 2], threads=1)
    with pytest.raises(ValueError, match="threads must be at least 1, not 0"):
        partition([1], [1], threads=0)


def test_nothing_to_cut_makes_no_task():
    assert partition([], [], threads=4) == []


sizes_strategy = st.lists(
    st.one_of(st.integers(0, 10**6), st.integers(10**6, 4 * 10**8)), max_size=300)


@settings(max_examples=200, deadline=None)
@given(sizes=sizes_strategy, threads=st.integers(1, 64))
def test_every_pair_runs_exactly_once_in_balanced_tasks(sizes, threads):
    tasks = partition(list(range(len(sizes))), sizes, threads=threads)
    check_invariants(tasks, sizes, threads)
    assert all(tasks)  # no empty task
    if sizes:  # no task costs more than the busiest a worker can be made
        total = sum(map(pair_cost, sizes))
        assert makespan(task_costs(tasks, sizes), threads) <= (
            total / threads + 2 * max(map(pair_cost, sizes)))


@settings(max_examples=100, deadline=None)
@given(sizes=sizes_strategy, threads=st.integers(1, 64), per_task=st.integers(1, 50))
def test_pairs_per_task_keeps_every_pair_once_in_runs(sizes, threads, per_task):
    tasks = partition(list(range(len(sizes))), sizes, threads=threads, pairs_per_task=per_task)
    assert sorted(i for task in tasks for i in task) == list(range(len(sizes)))
    assert all(1 <= len(task) <= per_task and task == list(range(task[0], task[0] + len(task)))
               for task in tasks)


@pytest.mark.parametrize("tasks", [0, 1, 2, 9, 10, 11, 12, 99, 100, 101, 1234])
def test_the_run_order_is_dasks_own(tasks):
    name = f"{TASK_NAME}-0123456789abcdef"
    graph = {(name, i): (len, ()) for i in range(tasks)}
    ranks = dask.order.order(graph)
    assert _run_order(tasks) == [key[1] for key in sorted(graph, key=ranks.__getitem__)]


@settings(max_examples=30, deadline=None)
@given(sizes=st.lists(st.integers(0, 10**9), min_size=1, max_size=60), threads=st.integers(1, 8))
def test_the_engine_places_the_costliest_task_where_dask_runs_it_first(sizes, threads, tmp_path_factory):
    folder = tmp_path_factory.mktemp("sizes")
    pairs = []
    for i, size in enumerate(sizes):
        paths = [folder / f"p{i}_{side}" for side in ("nucleotide", "protein")]
        for path, part in zip(paths, (size // 3, size - size // 3)):
            with open(path, "wb") as f:
                f.truncate(part)  # sparse: only the size counts
        pairs.append(Pair(f"p{i}", str(paths[0]), str(paths[1]), str(folder / f"o{i}")))
    placed = _partitions(pairs, None, threads)
    index = {p: i for i, p in enumerate(pairs)}
    expected = partition(pairs, sizes, threads=threads)
    in_run_order = [placed[slot] for slot in _run_order(len(placed))]
    assert in_run_order == expected
    assert [[index[p] for p in task] for task in expected] == partition(
        list(range(len(sizes))), sizes, threads=threads)


def test_a_run_merges_the_biggest_pair_first_and_reports_in_plan_order(tmp_path):
    features = tmp_path / "features"
    features.mkdir()
    for i in range(12):
        make_pair(features, f"chunk_{i}", rows=2, nucleotide_width=8, protein_width=8, seed=i)
    make_pair(features, "chunk_12", rows=600, seed=12)  # last in the plan, 6 MB of input
    planned = dask_merge.plan(features, output_dir=tmp_path / "out")
    finished: list[list[str]] = []

    class Watch(Callback):
        def _posttask(self, key, result, dsk, state, worker_id):
            if isinstance(key, tuple) and str(key[0]).startswith(TASK_NAME):
                finished.append([record.name for record in result])

    with Watch():
        report = planned.execute("sync", workers=2, progress=False)
    assert report.ok and report.counts["merged"] == 13
    assert finished[0] == ["chunk_12"]
    assert sorted(name for task in finished for name in task) == sorted(
        f"chunk_{i}" for i in range(13))
    assert [r.name for r in report.records] == [f"chunk_{i}" for i in range(13)]
    assert os.path.getsize(tmp_path / "out" / "chunk_12_merged.pt") > 600 * 3328 * 4
