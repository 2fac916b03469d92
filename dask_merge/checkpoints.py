"""Checkpoints: which outputs are done, from file metadata alone.

Beside each output, ``OUTPUT_DIR/.dask-merge/NAME.json`` records the size
and mtime of the inputs it was made from, its label and its own size and
mtime.  Deciding whether a pair is pending stats its files and reads that
record; no tensor is ever opened.
"""

from __future__ import annotations

import json
import os
import stat
from typing import NamedTuple

from .atomic import atomic_write
from .layouts import label_value
from .pairs import Pair

RECORD_FOLDER = ".dask-merge"
"""Where, inside the output folder, the checkpoint records live (one JSON per output)."""



def fingerprint(path: str | os.PathLike[str] | os.stat_result) -> dict[str, int]:
    """What identifies a file's content without reading it: size and mtime_ns.

    Of a path, or of what ``os.stat`` already said about one.
    """
    found = path if isinstance(path, os.stat_result) else os.stat(path)
    return {"size": found.st_size, "mtime_ns": found.st_mtime_ns}


def input_fingerprints(pair: Pair) -> dict[str, dict]:
    """Fingerprints of a pair's inputs; take them *before* merging.

    HDF5 files on the protein side are fingerprinted each, so that a
    regenerated ``embeddings.h5`` makes every pair pending again.

    Raises ``OSError`` naming the file when an input has gone.
    """
    if isinstance(pair.protein, str):
        protein = fingerprint(pair.protein)
    else:
        protein = {"files": [fingerprint(path) for path in pair.protein]}
    return {"nucleotide": fingerprint(pair.nucleotide), "protein": protein}


def record_path(output: str) -> str:
    """The checkpoint record of an output file."""
    folder, name = os.path.split(output)
    return os.path.join(folder, RECORD_FOLDER, name + ".json")


def write_checkpoint(
    pair: Pair, inputs: dict[str, dict[str, int]], *, labels: list[int] | None, rows: int
) -> None:
    """Record, beside a freshly written output, what it was made from.

    The record is written atomically but not fsynced: a power cut that loses
    or truncates it leaves the (fsynced) output without a readable record,
    which counts as done, as an output made elsewhere does.  That saves one
    of the two disk flushes per pair, which dominate small merges.
    """
    record = {
        "inputs": {side: {"path": getattr(pair, side), **fp} for side, fp in inputs.items()},
        "labels": labels,
        "output": fingerprint(pair.output),
        "rows": rows,
    }
    path = record_path(pair.output)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    atomic_write(path, lambda f: f.write(json.dumps(record, indent=1).encode()), durable=False)


def _read_record(path: str) -> object:
    """The JSON in ``path``, or None if it is not a readable regular file of JSON."""
    try:
        # Non-blocking: a FIFO planted as a record would block its open forever.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        with open(fd, "rb", closefd=False) as f:
            return json.load(f)
    except (OSError, ValueError, RecursionError):  # RecursionError: [[[[...]]]]
        return None
    finally:
        os.close(fd)


class Checkpoint(NamedTuple):
    """Whether a pair's output is done, and why."""

    done: bool
    reason: str


def checkpoint_state(pair: Pair, *, label: str | int | None = None, force: bool = False,
                     labels: list[int] | None = None) -> Checkpoint:
    """Decide from file metadata alone whether ``pair`` needs merging.

    Done when the output exists and its record says it was made from the
    inputs as they are now (and with the same ``label``: ``"viral"``,
    ``"host"``, an int or None, as :func:`~dask_merge.plan` takes it).  An
    output without a record, e.g. one that upstream wrote, counts as done too.
    ``labels`` is refused with a message that says what to pass instead.

    >>> checkpoint_state(Pair("a", "a_DNABERT_S.pt", "a_ESM.pt", "nowhere/a_merged.pt"))
    Checkpoint(done=False, reason='no output yet')
    >>> checkpoint_state(Pair("a", "n", "p", "o"), labels=[1])
    Traceback (most recent call last):
    TypeError: checkpoint_state takes label='viral', 'host', an int or None, not labels=[1] (pass label=1)
    """
    if labels is not None:
        instead = (f" (pass label={labels[0]!r})" if type(labels) is list and len(labels) == 1
                   else "")
        raise TypeError("checkpoint_state takes label='viral', 'host', an int or None, not "
                        f"labels={labels!r}{instead}")
    return labelled_checkpoint_state(pair, label_value(label), force=force)


def labelled_checkpoint_state(pair: Pair, labels: list[int] | None, *, force: bool = False
                              ) -> Checkpoint:
    """:func:`checkpoint_state` with the label as stored: ``label_value(label)``."""
    if force:
        return Checkpoint(False, "forced")
    try:
        found = os.stat(pair.output)
    except FileNotFoundError:
        return Checkpoint(False, "no output yet")
    except OSError as err:  # a symlink loop, no permission: the merge will replace it or say why
        return Checkpoint(False, f"no output yet (unreadable: {err.strerror})")
    if not stat.S_ISREG(found.st_mode):  # a folder or FIFO is no output
        return Checkpoint(False, "no output yet (not a file under its name)")
    output = fingerprint(found)
    record = _read_record(record_path(pair.output))
    if type(record) is not dict:  # missing, unreadable, or valid JSON but not a record
        return Checkpoint(True, "output exists (no record: made elsewhere)")
    if record.get("output") != output:
        return Checkpoint(True, "output exists (replaced since its record)")
    try:
        now = input_fingerprints(pair)
    except OSError as err:
        return Checkpoint(False, f"input unreadable: {err}")
    recorded = record.get("inputs")
    for side in ("nucleotide", "protein"):
        then = recorded.get(side) if type(recorded) is dict else None
        if type(then) is not dict or {k: then.get(k) for k in now[side]} != now[side]:
            return Checkpoint(False, f"{side} input changed since the merge")
    if record.get("labels") != labels:
        return Checkpoint(False, f"label changed ({record.get('labels')} -> {labels})")
    return Checkpoint(True, "up to date")
