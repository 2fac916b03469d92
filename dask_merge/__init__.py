"""dask_merge: merge VirNucPro's DNABERT-S and ESM-2 feature files, at scale, with Dask.

>>> import dask_merge
>>> report = dask_merge.run("features/", output_dir="merged/")  # doctest: +SKIP
"""

from .engine import ConfigurationError, Plan, Record, Report, plan, run
from .errors import FileFormatError, MergeError, MispairedError, OutputError, UnsafeFileError
from .merge import MergeResult, merge_pair
from .plan import Checkpoint, FoundPairs, Pair, checkpoint_state, find_pairs

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
