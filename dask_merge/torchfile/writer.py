"""Writing ``torch.save`` archives without torch."""

from __future__ import annotations

import io
import math
import struct
import zipfile
from collections.abc import Iterable, Mapping
from typing import BinaryIO, NamedTuple

import numpy as np

from .refs import STORAGE_NAMES

def _pickle_str(text: str) -> bytes:
    raw = text.encode("utf-8", "surrogatepass")
    return b"X" + struct.pack("<I", len(raw)) + raw


def _pickle_int(value: int) -> bytes:
    """The opcodes of an int: BININT, LONG1 or LONG4 (from 256 bytes on).

    >>> import pickle
    >>> values = (7, -2**31, 2**31, -2**2040, 2**2100)
    >>> [pickle.loads(b"\\x80\\x02" + _pickle_int(v) + b".") == v for v in values]
    [True, True, True, True, True]
    """
    if -(2**31) <= value < 2**31:
        return b"J" + struct.pack("<i", value)
    raw = value.to_bytes((value.bit_length() + 8) // 8, "little", signed=True)
    if len(raw) < 256:
        return b"\x8a" + bytes([len(raw)]) + raw  # LONG1
    return b"\x8b" + struct.pack("<i", len(raw)) + raw  # LONG4


class ArrayBlocks(NamedTuple):
    """An array of ``shape`` and ``dtype`` given as consecutive C-order blocks.

    :func:`write_archive` writes it block by block, so the whole array is
    never in memory: a merge fills a few hundred rows, writes them, reuses
    the buffer.
    """

    shape: tuple[int, ...]
    dtype: np.dtype
    blocks: Iterable[np.ndarray]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def _pickle_tensor(key: str, shape: tuple[int, ...], dtype: np.dtype) -> bytes:
    """The opcodes ``torch.save`` writes for a contiguous CPU tensor."""
    strides = [math.prod(shape[i + 1 :]) for i in range(len(shape))]
    return (
        b"ctorch._utils\n_rebuild_tensor_v2\n(("
        + _pickle_str("storage") + f"ctorch\n{STORAGE_NAMES[dtype]}\n".encode()
        + _pickle_str(key) + _pickle_str("cpu") + _pickle_int(math.prod(shape))
        + b"tQ" + _pickle_int(0)
        + b"(" + b"".join(map(_pickle_int, shape)) + b"t"
        + b"(" + b"".join(map(_pickle_int, strides)) + b"t"
        + b"\x89ccollections\nOrderedDict\n)RtR"
    )


def _pickle_value(value: object, arrays: list[np.ndarray | ArrayBlocks]) -> bytes:
    if isinstance(value, str):
        return _pickle_str(value)
    if isinstance(value, bool) or not isinstance(value, (int, list, dict, np.ndarray, ArrayBlocks)):
        raise TypeError(f"cannot write a {type(value).__name__} into a feature file")
    if isinstance(value, int):
        return _pickle_int(value)
    if isinstance(value, list):
        return b"](" + b"".join(_pickle_value(v, arrays) for v in value) + b"e"
    if isinstance(value, dict):
        return b"}(" + b"".join(
            _pickle_str(k) + _pickle_value(v, arrays) for k, v in value.items()
        ) + b"u"
    if value.dtype not in STORAGE_NAMES:
        raise TypeError(f"cannot write an array of {value.dtype} into a feature file")
    # Not np.ascontiguousarray: it turns a 0-d array into a 1-d one.
    if isinstance(value, np.ndarray) and not value.flags.c_contiguous:
        value = value.copy(order="C")
    arrays.append(value)
    return _pickle_tensor(str(len(arrays) - 1), value.shape, value.dtype)


def _flat_bytes(payload: bytes | np.ndarray) -> memoryview:
    # memoryview.cast refuses arrays with a zero in their shape: view as bytes first.
    return memoryview(payload.reshape(-1).view(np.uint8) if isinstance(payload, np.ndarray) else payload)


def _aligned_info(zf: zipfile.ZipFile, name: str, size: int, alignment: int = 64) -> zipfile.ZipInfo:
    """A stored ZipInfo whose data will start on an ``alignment`` boundary.

    torch aligns storages so that ``torch.load(mmap=True)`` can map them; it pads
    the local header's extra field with an 'FB' block, and so do we.
    """
    info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
    info.compress_type = zipfile.ZIP_STORED
    info.file_size = size
    zip64 = size * 1.05 > zipfile.ZIP64_LIMIT
    header_end = zf.fp.tell() + 30 + len(name.encode()) + (20 if zip64 else 0)
    pad = -(header_end + 4) % alignment
    info.extra = b"FB" + struct.pack("<H", pad) + b"Z" * pad
    return info


def write_archive(file: BinaryIO, obj: Mapping[str, object], *, name: str = "archive") -> None:
    """Write ``obj`` to ``file`` as ``torch.save`` would, readable by ``torch.load``.

    ``obj`` may hold str, int, lists and dicts of them, and numpy arrays of the
    dtypes in :data:`~dask_merge.torchfile.STORAGE_DTYPES`, which become tensors.  Nothing else: the
    output must load under ``torch.load``'s safe default.

    >>> import io
    >>> buffer = io.BytesIO()
    >>> write_archive(buffer, {"ids": ["a"], "data": np.arange(4, dtype=np.float32).reshape(2, 2)})
    >>> from dask_merge.torchfile import TorchArchive
    >>> saved = TorchArchive(buffer.getvalue(), "<memory>").load()
    >>> saved["ids"], saved["data"].shape
    (['a'], (2, 2))
    """
    arrays: list[np.ndarray | ArrayBlocks] = []
    pickled = b"\x80\x02" + _pickle_value(dict(obj), arrays) + b"."
    records: list[tuple[str, bytes | np.ndarray | ArrayBlocks]] = [  # torch's order
        (f"{name}/data.pkl", pickled),
        (f"{name}/.format_version", b"1"),
        (f"{name}/.storage_alignment", b"64"),
        (f"{name}/byteorder", b"little"),
        *((f"{name}/data/{i}", a) for i, a in enumerate(arrays)),
        (f"{name}/version", b"3\n"),
    ]
    if sum(_payload_size(p) for _, p in records) <= SMALL_ARCHIVE:
        # zipfile seeks back to each member's header: on a real file, some
        # 40 system calls per small archive; in memory, then one write.
        buffer = io.BytesIO()
        _zip(buffer, records)
        file.write(buffer.getbuffer())
    else:
        _zip(file, records)


SMALL_ARCHIVE = 1 << 20


def _payload_size(payload: bytes | np.ndarray | ArrayBlocks) -> int:
    return payload.nbytes if isinstance(payload, ArrayBlocks) else _flat_bytes(payload).nbytes


def _zip(file: BinaryIO, records: list[tuple[str, bytes | np.ndarray | ArrayBlocks]]) -> None:
    with zipfile.ZipFile(file, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
        for record, payload in records:
            blocks = payload.blocks if isinstance(payload, ArrayBlocks) else [payload]
            size = _payload_size(payload)
            info = _aligned_info(zf, record, size)
            written = 0
            with zf.open(info, "w") as out:
                for block in blocks:
                    written += out.write(_flat_bytes(block))
            if written != size:
                raise ValueError(f"{record}: {written} bytes given for an array of {size}")
