"""dask_merge: merge VirNucPro's DNABERT-S and ESM-2 feature files, at scale, with Dask.

>>> import dask_merge
>>> report = dask_merge.run("features/", output_dir="merged/")  # doctest: +SKIP

Importing the package imports no Dask: the kernel (``merge_pair``), the
planning (``find_pairs``, ``checkpoint_state``, ``plan``, ``plan_pairs``) and the report
need none, and an executor imports Dask when a run starts.  So a pool
worker that only merges pairs imports no more than the kernel and the core
of Dask that runs its tasks.  ``open_merged`` and ``check`` (and their
classes) import Dask's array and bag modules on first use.
"""

import importlib as _importlib
from typing import TYPE_CHECKING as _TYPE_CHECKING

from .api import Plan, plan, plan_pairs, run
from .checkpoints import Checkpoint, checkpoint_state
from .errors import (
    ConfigurationError, FileFormatError, MergeError, MispairedError, OutputError, UnsafeFileError,
)
from .merge import MergeResult, merge_pair
from .pairs import FoundPairs, Pair, find_pairs
from .report import Report
from .tasks import Record

if _TYPE_CHECKING:  # for type checkers and IDEs; at run time see __getattr__
    from .checks import CheckReport, check
    from .explore import MergedFeatures, open_merged

_LAZY = {"CheckReport": "checks", "check": "checks", "MergedFeatures": "explore",
         "open_merged": "explore"}

__all__ = [
    "CheckReport",
    "Checkpoint",
    "ConfigurationError",
    "FileFormatError",
    "FoundPairs",
    "MergeError",
    "MergeResult",
    "MergedFeatures",
    "MispairedError",
    "OutputError",
    "Pair",
    "Plan",
    "Record",
    "Report",
    "UnsafeFileError",
    "check",
    "checkpoint_state",
    "find_pairs",
    "merge_pair",
    "open_merged",
    "plan",
    "plan_pairs",
    "run",
]


def __getattr__(name: str):
    """Load :mod:`dask_merge.explore` or :mod:`dask_merge.checks` when one of their names is first used."""
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(_importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # once: later lookups do not come here
    return value


def __dir__() -> list[str]:
    names = set(globals()) | set(__all__)
    return sorted(n for n in names if not n.startswith("_") or n.startswith("__"))
