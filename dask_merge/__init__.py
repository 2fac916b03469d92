"""dask_merge: merge VirNucPro's DNABERT-S and ESM-2 feature files, at scale, with Dask.

>>> import dask_merge
>>> report = dask_merge.run("features/", output_dir="merged/")  # doctest: +SKIP

Importing the package imports no Dask: the kernel (``merge_pair``), the
planning (``find_pairs``, ``checkpoint_state``, ``plan``, ``plan_pairs``) and the report
need none, and an executor imports Dask when a run starts.  So a pool
worker that only merges pairs imports no more than the kernel and the core
of Dask that runs its tasks.
"""

from .api import Plan, plan, plan_pairs, run
from .errors import (
    ConfigurationError, FileFormatError, MergeError, MispairedError, OutputError, UnsafeFileError,
)
from .merge import MergeResult, merge_pair
from .pairs import Checkpoint, FoundPairs, Pair, checkpoint_state, find_pairs
from .report import Report
from .tasks import Record

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
    "plan_pairs",
    "run",
]
