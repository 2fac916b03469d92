"""Reading rows of an untrusted HDF5 ``embeddings`` dataset, bounded in memory and time.

Where a row's values are its bytes in the file (no filter, little-endian
float32, stored contiguously or in chunks of whole rows, no user block),
:meth:`Embeddings.byte_offsets` finds where each row lies, and
:func:`read_rows_at` reads rows from there straight into their place in a
caller's array, any number at a time: a merge then holds no more rows than
one block of its output.  Otherwise, without filters, rows are read with
hyperslab reads of at most :data:`SLAB_BYTES`.  With gzip (and shuffle),
each chunk is read raw and inflated here, never past its declared size: a
compression bomb costs the bytes of one chunk, not what it would inflate to.
Any other filter is refused before anything is read, so that no filter
plugin is ever loaded.
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Sequence

import h5py
import numpy as np

from .errors import FileFormatError, UnsafeFileError

MAX_WIDTH = 1 << 16  # ESM-2 3B: 2560
MAX_CHUNK_BYTES = 16 << 20  # HDF5's default chunk cache is 1 MiB; h5py's chunks <= 1 MiB
MIN_CHUNK_BYTES = 1 << 10  # or one row: smaller, a row spreads over too many chunks to read in time
MAX_BAND_BYTES = 64 << 20  # one row of chunks, assembled to copy rows out of it
SLAB_BYTES = 8 << 20  # one hyperslab read
GAP_ROWS = 16  # unneeded rows read rather than start another slab
IOV_MAX = 1024  # buffers one preadv call may fill (POSIX's least IOV_MAX is 16; Linux's 1024)
_FILTERS = {h5py.h5z.FILTER_DEFLATE: "gzip", h5py.h5z.FILTER_SHUFFLE: "shuffle"}


class Embeddings:
    """A checked ``embeddings`` dataset: rows x width float32, stored in its file.

    >>> import tempfile, os
    >>> path = os.path.join(tempfile.mkdtemp(), "e.h5")
    >>> with h5py.File(path, "w") as f:
    ...     _ = f.create_dataset("embeddings", data=np.arange(12, dtype="f4").reshape(4, 3),
    ...                          chunks=(2, 3), compression="gzip", shuffle=True)
    >>> with h5py.File(path, "r") as f:
    ...     out = np.empty((2, 3), np.float32)
    ...     Embeddings(path, f["embeddings"]).read_rows(np.array([1, 3]), out)
    >>> out
    array([[ 3.,  4.,  5.],
           [ 9., 10., 11.]], dtype=float32)
    """

    def __init__(self, path: str, ds: h5py.Dataset) -> None:
        self.where = f"{path}: dataset {ds.name.lstrip('/')!r}"
        check_embeddings(self.where, ds)
        self.ds = ds
        self.rows, self.width = ds.shape
        plist = ds.id.get_create_plist()
        self.filters = [plist.get_filter(i) for i in range(plist.get_nfilters())]
        self.chunks = ds.chunks

    def read_rows(self, rows: np.ndarray, out: np.ndarray) -> None:
        """Copy rows ``rows`` (sorted, unique, in range) into ``out``, in order."""
        try:
            if self.filters:
                self._read_chunked(rows, out)
            else:
                self._read_slabs(rows, out)
        except OSError as err:  # HDF5's own errors: a truncated or corrupt file
            raise FileFormatError(f"{self.where}: cannot be read, corrupt or truncated "
                                  f"({err})") from None

    def byte_offsets(self, rows: np.ndarray) -> np.ndarray | None:
        """Where in the file each of ``rows`` (sorted, unique, in range) starts, or None.

        None unless every row's ``4 * width`` bytes in the file are its
        float32 values, little-endian as this machine's: no filter, storage contiguous or in
        chunks of whole rows, every chunk needed written, no user block (HDF5
        before 1.14.4 gives chunk addresses without it).  The first row is
        read both ways and compared, so that a layout misread here costs the
        fast path, never a wrong value.

        Raises
        ------
        FileFormatError
            A chunk of another size than its rows, or the first row past the
            end of the file (:func:`read_rows_at` finds any other).
        """
        ds = self.ds
        if self.filters or not ds.dtype == np.dtype(np.float32) == np.dtype("<f4") \
                or ds.file.userblock_size or not hasattr(os, "preadv") or not len(rows):
            return None
        row_bytes = 4 * self.width
        layout = ds.id.get_create_plist().get_layout()
        if layout == h5py.h5d.CONTIGUOUS:
            start = ds.id.get_offset()
            if start is None:
                return None
            offsets = start + rows * row_bytes
        elif layout == h5py.h5d.CHUNKED and self.chunks[1] == self.width:
            offsets = self._chunked_offsets(rows, row_bytes)
            if offsets is None:
                return None
        else:
            return None
        first = np.empty((1, self.width), np.float32)
        read_rows_at(ds.file.id.get_vfd_handle(), offsets[:1], first, [0], self.where)
        if first.tobytes() != ds[int(rows[0])].tobytes():
            return None
        return offsets

    def _chunked_offsets(self, rows: np.ndarray, row_bytes: int) -> np.ndarray | None:
        band_rows = self.chunks[0]
        bands, which = np.unique(rows // band_rows, return_inverse=True)
        starts = np.empty(len(bands), np.int64)
        size = band_rows * row_bytes
        for i, band in enumerate(bands.tolist()):
            info = self.ds.id.get_chunk_info_by_coord((band * band_rows, 0))
            if info.byte_offset is None:  # never written: HDF5 reads the fill value
                return None
            if info.size != size:
                raise FileFormatError(f"{self.where}: the chunk at {(band * band_rows, 0)} "
                                      f"stores {info.size} bytes, not its {size}")
            starts[i] = info.byte_offset
        return starts[which] + rows % band_rows * row_bytes

    def _read_slabs(self, rows: np.ndarray, out: np.ndarray) -> None:
        most = max(1, SLAB_BYTES // (4 * self.width))
        buffer = np.empty((min(most, rows[-1] - rows[0] + 1), self.width), np.float32)
        done = 0
        while done < len(rows):
            first = rows[done]
            # The run: following rows less than GAP_ROWS apart, within one slab.
            end = done + 1
            while end < len(rows) and rows[end] - rows[end - 1] <= GAP_ROWS and \
                    rows[end] - first < most:
                end += 1
            span = rows[end - 1] - first + 1
            self.ds.read_direct(buffer, np.s_[first : first + span], np.s_[0:span])
            out[done:end] = buffer[rows[done:end] - first]
            done = end

    def _read_chunked(self, rows: np.ndarray, out: np.ndarray) -> None:
        band_rows, chunk_cols = self.chunks
        band = np.empty((band_rows, self.width), np.float32)
        bands = rows // band_rows
        cuts = np.flatnonzero(np.diff(bands)) + 1
        for part, start in zip(np.split(rows, cuts), np.concatenate([[0], cuts])):
            top = int(part[0]) // band_rows * band_rows
            for left in range(0, self.width, chunk_cols):
                chunk = self._chunk((top, left))
                band[:, left : left + chunk_cols] = chunk[:, : self.width - left]
            out[start : start + len(part)] = band[part - top]

    def _chunk(self, offset: tuple[int, int]) -> np.ndarray:
        shape = self.chunks
        size = shape[0] * shape[1] * 4
        info = self.ds.id.get_chunk_info_by_coord(offset)
        if info.byte_offset is None:  # never written: HDF5 reads the fill value
            return np.full(shape, self.ds.fillvalue, np.float32)
        if info.size > size + size // 100 + 1024:  # gzip adds at most ~0.03% to random bytes
            raise FileFormatError(f"{self.where}: the chunk at {offset} stores {info.size} "
                                  f"bytes, more than its {size} bytes uncompressed")
        mask, data = self.ds.id.read_direct_chunk(offset)
        for i in reversed(range(len(self.filters))):
            if not mask >> i & 1:
                data = self._undo(self.filters[i][0], data, size, offset)
        if len(data) != size:
            raise FileFormatError(f"{self.where}: the chunk at {offset} holds {len(data)} "
                                  f"bytes, not {size}")
        return np.frombuffer(data, self.ds.dtype).reshape(shape).astype(np.float32, copy=False)

    def _undo(self, code: int, data: bytes, size: int, offset: tuple[int, int]) -> bytes:
        if code == h5py.h5z.FILTER_SHUFFLE:
            planes = np.frombuffer(data, np.uint8)
            if len(planes) != size:
                return data  # reported by the caller, with the size
            return planes.reshape(4, -1).T.tobytes()
        inflate = zlib.decompressobj()
        try:
            plain = inflate.decompress(data, size)
        except zlib.error as err:
            raise FileFormatError(f"{self.where}: the chunk at {offset} is not valid gzip "
                                  f"({err})") from None
        if inflate.unconsumed_tail:
            raise FileFormatError(f"{self.where}: the chunk at {offset} inflates to more than "
                                  f"its {size} bytes; refused")
        if not inflate.eof:
            raise FileFormatError(f"{self.where}: the chunk at {offset} is truncated")
        return plain


def read_rows_at(fd: int, offsets: np.ndarray, out: np.ndarray, into: Sequence[int],
                 where: str) -> None:
    """Read the row at byte ``offsets[k]`` of ``fd`` into ``out[into[k]]``, for each ``k``.

    Rows that follow one another in the file are read by one ``preadv``
    into their places, wherever these are; ``out``'s rows must each be
    contiguous (a column slice of a C-ordered array is).

    Raises
    ------
    FileFormatError
        The file ends before a row does (``where`` names it).
    """
    row_bytes = 4 * out.shape[1]
    order = np.argsort(offsets, kind="stable")
    ordered = offsets[order]
    cuts = np.flatnonzero(np.diff(ordered) != row_bytes) + 1
    bounds = np.concatenate([[0], cuts, [len(order)]]).tolist()
    into = np.asarray(into)[order].tolist()
    for first, stop in zip(bounds[:-1], bounds[1:]):
        for start in range(first, stop, IOV_MAX):
            end = min(stop, start + IOV_MAX)
            at = int(ordered[start])
            if os.preadv(fd, [out[k] for k in into[start:end]], at) != (end - start) * row_bytes:
                raise FileFormatError(f"{where}: the file ends within the rows from byte {at:,} "
                                      "on: truncated")


def check_embeddings(where: str, ds: h5py.Dataset) -> None:
    """Refuse what is not a bounded rows x width float32 dataset stored in ``path``."""
    check_stored_in_file(where, ds)
    if ds.ndim != 2 or ds.dtype.kind != "f" or ds.dtype.itemsize != 4:
        raise FileFormatError(f"{where} must be 2-D float32 (rows x width), "
                              f"found {ds.dtype} of shape {ds.shape}")
    width = ds.shape[1]
    if not 0 < width <= MAX_WIDTH:
        raise FileFormatError(f"{where}: width {width}; expected 1 to {MAX_WIDTH}")
    plist = ds.id.get_create_plist()
    filters = [plist.get_filter(i) for i in range(plist.get_nfilters())]
    for code, _, _, name in filters:
        if code not in _FILTERS:
            raise UnsafeFileError(f"{where}: compressed with filter {code} "
                                  f"({name.decode(errors='replace')}); only gzip and shuffle "
                                  "are read")
    if ds.chunks is not None:
        _check_chunks(where, ds.chunks, width, filtered=bool(filters))


def _check_chunks(where: str, chunks: tuple[int, int], width: int, *,
                  filtered: bool) -> None:
    size = chunks[0] * chunks[1] * 4
    if size > MAX_CHUNK_BYTES or size < min(MIN_CHUNK_BYTES, width * 4):
        raise FileFormatError(f"{where}: chunks of {chunks[0]} x {chunks[1]} values; expected "
                              f"{MIN_CHUNK_BYTES} to {MAX_CHUNK_BYTES} bytes each")
    if filtered and chunks[0] * width * 4 > MAX_BAND_BYTES:
        raise FileFormatError(f"{where}: chunks of {chunks[0]} rows of {width} values exceed "
                              f"{MAX_BAND_BYTES} bytes")


def check_stored_in_file(where: str, ds: h5py.Dataset) -> None:
    """Refuse a dataset whose data lies outside its file (virtual, external storage)."""
    if ds.is_virtual:
        raise UnsafeFileError(f"{where} is a virtual dataset (its data is in other files); refused")
    if ds.id.get_create_plist().get_external_count():
        raise UnsafeFileError(f"{where} keeps its data in external files; refused")
