"""dask_merge: merge VirNucPro's DNABERT-S and ESM-2 feature files, at scale, with Dask.

>>> import dask_merge
>>> report = dask_merge.run("features/", output_dir="merged/")  # doctest: +SKIP

The kernel (``merge_pair``, ``find_pairs``, ``checkpoint_state``, the errors)
is imported with the package; the engine (``plan``, ``run``, ``Plan``,
``Report``, ``ConfigurationError``), which imports Dask, distributed and
dask.bag, on first use.  So a pool worker that only merges pairs imports no
more than the kernel and the core of Dask that runs its tasks.
"""

import importlib as _importlib
from typing import TYPE_CHECKING as _TYPE_CHECKING

from .errors import FileFormatError, MergeError, MispairedError, OutputError, UnsafeFileError
from .merge import MergeResult, merge_pair
from .pairs import Checkpoint, FoundPairs, Pair, checkpoint_state, find_pairs

if _TYPE_CHECKING:  # for type checkers and IDEs; at run time see __getattr__
    from .engine import ConfigurationError, Plan, Report, plan, run
    from .tasks import Record

_LAZY = {
    "ConfigurationError": "engine",
    "Plan": "engine",
    "Report": "engine",
    "plan": "engine",
    "run": "engine",
    "Record": "tasks",
}

__all__ = [
    "Checkpoint",
    "ConfigurationError",
    "FileFormatError",
    "FoundPairs",
    "MergeError",
    "MergeResult",
    "MispairedError",
    "OutputError",
    "Pair",
    "Plan",
    "Record",
    "Report",
    "UnsafeFileError",
    "checkpoint_state",
    "find_pairs",
    "merge_pair",
    "plan",
    "run",
]


def __getattr__(name: str):
    """Load the engine (and Dask) when one of its names is first used."""
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(_importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # once: later lookups do not come here
    return value


def __dir__() -> list[str]:
    names = set(globals()) | set(__all__)
    return sorted(n for n in names if not n.startswith("_") or n.startswith("__"))
