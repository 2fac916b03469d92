"""Run ``dask-merge ARGS`` in this interpreter; print what started, as JSON.

``dask_up``: whether the pool's fork server was up when Dask was first
imported (absent: Dask never was); ``started``: whether the fork server
ever started; ``children``: the processes this one has at the end.
``_forkserver_pid`` is CPython's.
"""

import json
import sys
from multiprocessing import forkserver

import psutil

from dask_merge.cli import main

seen = {}


class Watch:
    def find_spec(self, name, path=None, target=None):
        if name == "dask" and "dask_up" not in seen:
            seen["dask_up"] = forkserver._forkserver._forkserver_pid is not None


sys.meta_path.insert(0, Watch())
try:
    main(sys.argv[1:])
except SystemExit as end:
    seen["exit"] = end.code
seen["started"] = forkserver._forkserver._forkserver_pid is not None
seen["children"] = [" ".join(p.cmdline()) for p in psutil.Process().children(recursive=True)]
print(json.dumps(seen))
