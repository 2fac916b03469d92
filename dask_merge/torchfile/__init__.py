"""Safe reading and writing of ``torch.save`` archives, without importing torch.

A ``.pt`` file written by ``torch.save`` is an uncompressed zip archive that
holds ``ARCHIVE/data.pkl``, a pickle of the saved object, and one record
``ARCHIVE/data/KEY`` with the raw bytes of each tensor storage.

Pickles can run code, and feature files come from shared storage and
downloads.  So this package does not use :mod:`pickle` to read them.  It runs
its own small pickle machine that knows the opcodes plain containers need and
three globals: torch's tensor rebuilder, torch's typed storage names and
``collections.OrderedDict`` (the empty backward-hook table).  Nothing that a
file names is ever imported or called: a global is a token, and ``REDUCE`` of
a token runs the package's own rebuilder.  Anything else is refused with
:class:`~dask_merge.errors.UnsafeFileError` before it could take effect.

Tensors come back as :class:`TensorRef` (a validated view of a storage record,
read on demand) and runs of pickled floats that fill a list as
:class:`FloatRun` (decoded later with numpy in one go).  That is where the
speed comes from: a 10,000-row DNABERT-S file holds 7.68 M pickled floats,
which :func:`torch.load` turns into Python floats one by one.

The modules: :mod:`.zipdir` reads the zip directory, :mod:`.unpickler` is
the pickle machine (its record fast paths in :mod:`.fastpaths`, runs of
records read in bulk in :mod:`.runs`), :mod:`.textspans` decodes many
strings at once, :mod:`.archive` ties them to a file (and reads one ahead),
:mod:`.buffers` reuses read memory, :mod:`.writer` writes archives.
"""

from .archive import ReadAhead, TorchArchive
from .buffers import ReadBufferPool, keep_read_buffers, reused_read_buffers, worker_read_buffers
from .refs import STORAGE_DTYPES, FloatRun, StorageRef, TensorRef, short_repr
from .writer import ArrayBlocks, write_archive

__all__ = [
    "STORAGE_DTYPES", "ArrayBlocks", "FloatRun", "ReadAhead", "ReadBufferPool", "StorageRef",
    "TensorRef", "TorchArchive", "keep_read_buffers", "reused_read_buffers", "short_repr",
    "worker_read_buffers", "write_archive",
]
