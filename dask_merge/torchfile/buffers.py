"""Read buffers reused from archive to archive.

Reading a big pair (168 MB) into new memory costs some 43,000 page faults,
each a page the kernel zeroes first: 70 ms of a 0.5 s merge, and memory
bandwidth that parallel workers share.  Reading into the same buffer again
costs none.  A :class:`ReadBufferPool` keeps one buffer per slot
(``"nucleotide"``, ``"protein"``) and thread.

A task makes a pool active with :func:`reused_read_buffers`; archives opened
there with a ``slot`` read into it.  A process that lives for one run (a pool
worker, a worker of a cluster started for the run) keeps one pool for its
life (:func:`keep_read_buffers`); any other caller gets a fresh pool per
block, released with it.
"""

from __future__ import annotations

import contextlib
import functools
import mmap
import os
import threading
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from typing import BinaryIO


class ReadBufferPool:
    """One buffer per slot and thread, into which files are read whole.

    The price of reuse: an archive read into a slot's buffer, and every array
    that views it, is overwritten when the next file of that slot is read in
    the same thread.  Nothing read through a pool may be kept past its merge.

    >>> import tempfile
    >>> pool = ReadBufferPool()
    >>> with tempfile.TemporaryFile() as f:
    ...     _ = f.write(b"abc"), f.seek(0)
    ...     first = bytes(pool.read(f, "x"))
    ...     _ = f.truncate(1), f.seek(0)
    ...     second = pool.read(f, "x")
    >>> first, bytes(second), second.obj is pool.buffers()["x"]
    (b'abc', b'a', True)
    """

    def __init__(self) -> None:
        self._local = threading.local()

    def buffers(self) -> dict[str, mmap.mmap]:
        """This thread's buffers, by slot."""
        slots = getattr(self._local, "slots", None)
        if slots is None:
            slots = self._local.slots = {}
        return slots

    def read(self, f: BinaryIO, slot: str, *, buffers: dict[str, mmap.mmap] | None = None
             ) -> bytes | memoryview:
        """The whole of ``f``, read into ``slot``'s buffer (grown if too small).

        ``buffers``: another thread's :meth:`buffers`, to read into (see
        :func:`whole_reader`); this thread's by default.
        """
        size = os.fstat(f.fileno()).st_size
        buffers = self.buffers() if buffers is None else buffers
        buffer = buffers.get(slot)
        if buffer is None or len(buffer) <= size:
            # Replaced, never resized: a view of the old one may still be alive.
            # Anonymous memory, not a bytearray (which zeroes every byte): the
            # headroom costs no memory until a bigger file fills it.
            buffer = buffers[slot] = mmap.mmap(-1, size + 1 + size // 8)
        view = memoryview(buffer)
        read = f.readinto(view)
        if read < len(buffer):
            return view[:read]
        # Longer than its size said: it grew as we read it.
        return bytes(view) + f.read()

    @contextlib.contextmanager
    def active(self) -> Iterator[ReadBufferPool]:
        """Within this block (in this thread or task), slotted reads use this pool."""
        token = _active.set(self)
        try:
            yield self
        finally:
            _active.reset(token)


_active: ContextVar[ReadBufferPool | None] = ContextVar("dask_merge_read_buffers", default=None)
_worker_pool: ReadBufferPool | None = None  # see keep_read_buffers


def whole_reader(slot: str | None) -> Callable[[BinaryIO], bytes | memoryview]:
    """What reads a whole file for this thread: into ``slot``'s buffer of the active pool,
    if both are given; else into new memory.

    A helper thread may call it: it then reads into this thread's buffer.
    """
    pool = _active.get()
    if pool is None or slot is None:
        return _read_all
    buffers = pool.buffers()
    return functools.partial(pool.read, slot=slot, buffers=buffers)


def _read_all(f: BinaryIO) -> bytes:
    return f.read()


@contextlib.contextmanager
def reused_read_buffers() -> Iterator[ReadBufferPool]:
    """Within this block, archives opened with a ``slot`` reuse that slot's buffer.

    The pool is the one already active (nested blocks), else the process's
    own (:func:`keep_read_buffers`), else a fresh one that goes with the block.
    """
    pool = _active.get() or _worker_pool or ReadBufferPool()
    with pool.active():
        yield pool


def keep_read_buffers() -> None:
    """Give this process one pool for its life: for a process that lives for one run.

    A worker of the pool, or of a cluster started for one run, then reads each
    pair into the memory of the previous one, even with one pair per task.
    """
    global _worker_pool
    if _worker_pool is None:
        _worker_pool = ReadBufferPool()


def worker_read_buffers() -> ReadBufferPool | None:
    """The pool this process keeps for its life, if :func:`keep_read_buffers` made one."""
    return _worker_pool
