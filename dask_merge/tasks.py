"""What runs on a worker: merge a batch of pairs, checkpoint each, return small records.

This module imports the kernel and nothing of Dask, distributed or torch, so
that a pool process of the ``processes`` scheduler holds numpy, the kernel
and only the core of Dask that runs its tasks.
:mod:`dask_merge.executors` schedule these functions.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
import traceback
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Literal

from .errors import MergeError
from .atomic import grouped_folder_syncs
from .merge import merge_pair
from .checkpoints import input_fingerprints, write_checkpoint
from .pairs import Pair
from .torchfile import keep_read_buffers, reused_read_buffers


Status = Literal["merged", "skipped", "failed"]


@dataclass
class Record:
    """What happened to one pair: what the client gets back instead of tensors."""

    name: str
    status: Status
    rows: int | None = None
    nucleotide_only: int | None = None
    protein_only: int | None = None
    nucleotide_only_examples: list[str] = field(default_factory=list)
    protein_only_examples: list[str] = field(default_factory=list)
    seconds: float | None = None
    error: str | None = None
    reason: str | None = None  # why a pair was skipped
    output: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def merge_one(pair: Pair, labels: list[int] | None, max_dropped: float | None = None) -> Record:
    """Merge one pair and checkpoint it; never raises: failures become records."""
    start = time.perf_counter()
    try:
        inputs = input_fingerprints(pair)  # before reading: a later change shows
        result = merge_pair(pair.nucleotide, pair.protein, pair.output, label=labels and labels[0],
                            max_dropped=max_dropped)
        try:
            write_checkpoint(pair, inputs, labels=labels, rows=result.rows)
        except BaseException:
            # An output without a record counts as made elsewhere: a rerun
            # would skip it for good.  Without it, the rerun merges again.
            with contextlib.suppress(OSError):
                os.unlink(pair.output)
            raise
    except MergeError as err:
        return Record(pair.name, "failed", error=str(err), seconds=time.perf_counter() - start)
    except OSError as err:
        return Record(pair.name, "failed", seconds=time.perf_counter() - start,
                      error=f"{err.filename or pair.name}: {err.strerror or err}")
    except Exception as err:  # a bug, not bad input: keep the traceback's tail
        where = traceback.format_exc(limit=-3)
        return Record(pair.name, "failed", seconds=time.perf_counter() - start,
                      error=f"unexpected {type(err).__name__}: {err}\n{where}")
    return Record(
        pair.name, "merged", rows=result.rows,
        nucleotide_only=result.nucleotide_only, protein_only=result.protein_only,
        nucleotide_only_examples=list(result.nucleotide_only_examples),
        protein_only_examples=list(result.protein_only_examples),
        seconds=result.seconds, output=result.output,
    )


def merge_pairs(pairs: Sequence[Pair], labels: list[int] | None,
                max_dropped: float | None = None) -> list[Record]:
    """The task of one batch (a bag partition): merge its pairs one after another."""
    with grouped_folder_syncs(), reused_read_buffers():
        return [merge_one(Pair(*pair), labels, max_dropped) for pair in pairs]


def records_as_dicts(records: list[Record]) -> list[dict]:
    """A task's records as the JSON report has them (:meth:`Record.to_dict`)."""
    return [record.to_dict() for record in records]


def crashed(pairs: Sequence[Pair], why: str) -> list[Record]:
    """Records of pairs whose worker died under them, after every retry."""
    return [Record(Pair(*p).name, "failed", error=f"{why}; the pair was retried, then given up")
            for p in pairs]


def limit_threads(threads: int) -> None:
    """Cap OpenMP / MKL / OpenBLAS threads of this process: workers x threads <= cores.

    The merge itself uses no threads; a torch or BLAS library imported by the
    user's ``__main__`` (which spawned workers run again, on Windows) would
    otherwise start one thread per core in each worker.
    """
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(threads)
    if "torch" in sys.modules:  # never imported here, only tamed
        sys.modules["torch"].set_num_threads(threads)


def pool_worker(threads: int) -> None:
    """Initializer of the pool's processes.

    Ctrl-C is the parent's to handle: a terminal sends SIGINT to the whole
    process group, and the parent stops the workers itself (no tracebacks
    from each of them).
    """
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    limit_threads(threads)
    # The process lives for one run: its input buffers serve every task.
    keep_read_buffers()
