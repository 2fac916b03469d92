"""The errors a merge can raise.

Every message names the file at fault and, where there is one, the id or key.
The engine turns these into ``failed`` records; other pairs go on.
"""

from __future__ import annotations


class MergeError(Exception):
    """A pair could not be merged. The message says what is wrong and where."""


class FileFormatError(MergeError):
    """A file is truncated, not a torch archive, or not in the expected layout."""


class UnsafeFileError(FileFormatError):
    """A file's pickle asks for something beyond tensors and plain containers.

    Nothing it asked for was run: the reader refuses before calling anything.
    """


class MispairedError(MergeError):
    """The two files of a pair share no sequence id: they were not made together."""


class OutputError(MergeError):
    """The merged file could not be written (full disk, read-only folder, ...)."""


class ConfigurationError(ValueError):
    """The run cannot start: a missing folder, no pairs, a bad scheduler, ..."""
