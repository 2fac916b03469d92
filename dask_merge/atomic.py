"""Atomic writing: a file appears under its name complete or not at all.

Every file this package writes (merged outputs, checkpoint records, reports)
goes through :func:`atomic_write`: a locked temporary beside the target,
renamed over it.  :func:`remove_stale_temporaries` removes what killed
writers left; :func:`grouped_folder_syncs` lets a batch of small writes share
one folder fsync.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import threading
import uuid
from collections.abc import Callable, Iterator
from typing import BinaryIO

from .errors import OutputError


_TEMPORARY_MARK = ".dask-merge-tmp-"
# Exactly the names _locked_temporary makes: a user's file that merely holds
# the mark (an input, when outputs go next to the inputs) is never removed.
_TEMPORARY_NAME = re.compile(r"\..*" + re.escape(_TEMPORARY_MARK) + r"[0-9a-f]{32}", re.DOTALL)


def atomic_write(path: str, write: Callable[[BinaryIO], None], *, durable: bool = True) -> None:
    """Write a file that appears under ``path`` only when complete.

    ``write`` fills a temporary file in the same folder, which is flushed,
    fsynced and renamed over ``path`` (atomic on POSIX), and the folder is
    fsynced so that the rename survives a power cut.  Concurrent writers of
    one path each rename a complete file; the last one wins.  From just
    after its creation until its rename, the temporary holds an exclusive
    lock: an unlocked temporary is a dead writer's, and
    :func:`remove_stale_temporaries` removes it.  A big file goes to the
    disk as it is written, not all at the fsync (:class:`_EarlyWriteback`).

    ``durable=False`` skips both fsyncs, for files whose loss or truncation
    by a power cut is harmless (checkpoint records): the rename still makes
    the file appear whole to every other process.

    Raises
    ------
    OutputError
        The folder is missing or read-only, the disk is full, ...; no file is
        left behind under either name.
    """
    folder, name = os.path.split(os.path.abspath(path))
    try:
        fd, temporary = _locked_temporary(folder, name)
    except OSError as err:
        raise OutputError(f"{path}: cannot write in {folder} ({err.strerror})") from None
    try:
        with os.fdopen(fd, "wb") as f:
            write(_EarlyWriteback(f) if durable and _CAN_START_WRITEBACK else f)
            f.flush()
            if durable:
                os.fsync(f.fileno())
            os.replace(temporary, path)
    except BaseException as err:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        if isinstance(err, OSError):
            raise OutputError(f"{path}: cannot write ({err.strerror or err})") from None
        raise
    if durable:
        pending = getattr(_deferred, "folders", None)
        if pending is None:
            _fsync_folder(folder)
        else:
            pending.add(folder)


_deferred = threading.local()

# Linux and most Unixes; not macOS or Windows, where the fsync does it all.
_CAN_START_WRITEBACK = hasattr(os, "posix_fadvise")


class _EarlyWriteback:
    """A file being written that hands each few MiB to the disk straight away.

    Left alone, the kernel keeps a big output dirty in memory until the
    fsync at its end, which then waits for all of it while the CPU idles;
    16 merged files of 133 MB take 4.5 s on two workers that way, 3.8 s
    like this.  ``POSIX_FADV_DONTNEED`` on what was just written starts its
    writeback (PostgreSQL does the same where it lacks ``sync_file_range``)
    and drops the pages already on disk from the page cache: a batch job
    never reads its outputs back, and the inputs stay cached instead.
    Seeks (zipfile rewrites each member's header) go to the file unchanged.
    """

    def __init__(self, file: BinaryIO, *, every: int = 8 << 20) -> None:
        self._file = file
        self._every = every
        self._handed = 0  # bytes before this offset were handed to the disk

    def write(self, data) -> int:
        written = self._file.write(data)
        end = self._file.tell()
        if end - self._handed >= self._every:
            self._file.flush()  # out of Python's buffer, into the kernel's
            with contextlib.suppress(OSError):  # advice only: the fsync still decides
                os.posix_fadvise(self._file.fileno(), self._handed, end - self._handed,
                                 os.POSIX_FADV_DONTNEED)
            self._handed = end
        return written

    def __getattr__(self, name: str):
        return getattr(self._file, name)


@contextlib.contextmanager
def grouped_folder_syncs() -> Iterator[None]:
    """Within this block, :func:`atomic_write` fsyncs each folder once, at the end.

    A rename is durable once its folder is fsynced.  A batch of tiny merges
    writes one output per pair into the same folder: syncing it once per
    batch instead of once per output saves a disk flush per pair.  Until the
    end of the block, a power cut may undo renames, never tear a file: an
    undone pair is simply pending again.
    """
    outer = getattr(_deferred, "folders", None)
    if outer is not None:  # nested: the outer block syncs
        yield
        return
    _deferred.folders = set()
    try:
        yield
    finally:
        folders, _deferred.folders = _deferred.folders, None
        for folder in sorted(folders):
            _fsync_folder(folder)


def _locked_temporary(folder: str, name: str) -> tuple[int, str]:
    """Create and lock a new temporary for ``name``; return its descriptor and path."""
    # A long name is cut (in bytes, as the file system counts) so that its
    # temporary's name fits in NAME_MAX, 255 bytes on Linux file systems.
    name = os.fsdecode(os.fsencode(name)[: 255 - len(f".{_TEMPORARY_MARK}") - 32])
    while True:
        temporary = os.path.join(folder, f".{name}{_TEMPORARY_MARK}{uuid.uuid4().hex}")
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        fcntl.flock(fd, fcntl.LOCK_EX)
        # Between creating and locking it, a cleaner may have taken the
        # unlocked file for a dead writer's and removed it: start again.
        if os.fstat(fd).st_nlink:
            return fd, temporary
        os.close(fd)


def _fsync_folder(folder: str) -> None:
    # Makes the rename itself durable; some file systems refuse, harmlessly.
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def is_temporary(name: str) -> bool:
    """True for the name of a temporary that :func:`atomic_write` makes.

    >>> is_temporary(".a_merged.pt.dask-merge-tmp-" + "0f" * 16)
    True
    >>> is_temporary("x.dask-merge-tmp-y_DNABERT_S.pt"), is_temporary("a_merged.pt")
    (False, False)
    """
    return _TEMPORARY_NAME.fullmatch(name) is not None


def remove_stale_temporaries(folder: str) -> list[str]:
    """Remove temporaries left by killed writers in ``folder``; return their paths.

    A temporary that no process holds locked is a dead writer's (see
    :func:`atomic_write`): it goes, whatever its age, and it is safe to call
    this while other runs write into ``folder``.
    """
    removed = []
    with contextlib.suppress(FileNotFoundError, NotADirectoryError):
        for entry in os.scandir(folder):
            if not is_temporary(entry.name) or not entry.is_file(follow_symlinks=False):
                continue
            with contextlib.suppress(FileNotFoundError, BlockingIOError, PermissionError):
                with open(entry.path, "rb") as f:
                    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    # Still the file opened (not renamed away and replaced)?
                    if os.stat(entry.path).st_ino != os.fstat(f.fileno()).st_ino:
                        continue
                    os.unlink(entry.path)
                removed.append(entry.path)
    return removed
