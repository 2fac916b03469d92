"""dask_merge: merge VirNucPro's DNABERT-S and ESM-2 feature files, at scale, with Dask.

>>> import dask_merge
>>> report = dask_merge.run("features/", output_dir="merged/")  # doctest: +SKIP

Importing the package imports only its errors: each other name loads its
module when first used (``from dask_merge import merge_pair`` too).  So the
``dask-merge`` command starts its pool's fork server before it imports
numpy and the rest, and both import at once, on two cores.  The kernel
(``merge_pair``), the planning (``find_pairs``, ``checkpoint_state``,
``plan``, ``plan_pairs``) and the report import no Dask, and an executor
imports Dask when a run starts: a pool worker that only merges pairs
imports no more than the kernel and the core of Dask that runs its tasks.
``open_merged`` and ``check`` (and their classes) import Dask's array
module and its local schedulers.
"""

import importlib as _importlib
from typing import TYPE_CHECKING as _TYPE_CHECKING

from .errors import (
    ConfigurationError, FileFormatError, MergeError, MispairedError, OutputError, UnsafeFileError,
)

if _TYPE_CHECKING:  # for type checkers and IDEs; at run time see __getattr__
    from .api import Plan, plan, plan_pairs, run
    from .checkpoints import Checkpoint, checkpoint_state
    from .checks import CheckReport, check
    from .explore import MergedFeatures, open_merged
    from .merge import MergeResult, merge_pair
    from .pairs import FoundPairs, Pair, find_pairs
    from .report import Report
    from .tasks import Record

_LAZY = {
    "Plan": "api", "plan": "api", "plan_pairs": "api", "run": "api",
    "Checkpoint": "checkpoints", "checkpoint_state": "checkpoints",
    "CheckReport": "checks", "check": "checks",
    "MergedFeatures": "explore", "open_merged": "explore",
    "MergeResult": "merge", "merge_pair": "merge",
    "FoundPairs": "pairs", "Pair": "pairs", "find_pairs": "pairs",
    "Report": "report",
    "Record": "tasks",
}

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
    """Load the module of a public name when the name is first used."""
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(_importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # once: later lookups do not come here
    return value


def __dir__() -> list[str]:
    names = set(globals()) | set(__all__)
    return sorted(n for n in names if not n.startswith("_") or n.startswith("__"))
