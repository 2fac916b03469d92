"""A pipeline script written in a hurry: it imports torch, and has no ``__main__`` guard.

Run as a copy, ``pipeline.py``, by path or with ``-m``, with FEATURES, OUT and RAN set:
it appends its process id to RAN in every process that runs it, merges, and
prints as JSON the report's counts and the modules a worker of the pool has.
"""

import json
import os
from concurrent.futures import ProcessPoolExecutor

try:
    import torch  # noqa: F401 (what workers must not pay for)
except ImportError:  # a Python without torch: the script's side effects still show
    pass

import dask_merge
from dask_merge._worker_main import pool_context

features, out, ran = os.environ["FEATURES"], os.environ["OUT"], os.environ["RAN"]
with open(ran, "a") as f:
    f.write(f"{os.getpid()}\n")
report = dask_merge.run(features, output_dir=out, scheduler="processes", workers=2, progress=False)
with ProcessPoolExecutor(1, mp_context=pool_context()) as pool:  # a worker as the run's
    modules = pool.submit(eval, "sorted(__import__('sys').modules)").result(timeout=60)
print(json.dumps({"counts": report.counts, "modules": modules}))
