"""``dask_merge.run(FEATURES, output_dir=OUT, scheduler=SCHEDULER)``; print what it started, as JSON.

``dask_up``: whether the pool's fork server was up when Dask was first
imported (absent: Dask never was); ``started``: whether the fork server ever
started (``_forkserver_pid`` is CPython's); ``modules``: the top-level
modules imported at the end; ``children``: this process's children at the
end; ``counts``: the report's.
"""

import json
import sys
from multiprocessing import forkserver

import psutil

seen = {}


class Watch:
    def find_spec(self, name, path=None, target=None):
        if name == "dask" and "dask_up" not in seen:
            seen["dask_up"] = forkserver._forkserver._forkserver_pid is not None


if __name__ == "__main__":
    sys.meta_path.insert(0, Watch())
    import dask_merge

    features, out, scheduler = sys.argv[1:]
    report = dask_merge.run(features, output_dir=out, scheduler=scheduler, workers=2,
                            progress=False)
    seen["counts"] = report.counts
    seen["started"] = forkserver._forkserver._forkserver_pid is not None
    seen["modules"] = sorted({m.split(".")[0] for m in sys.modules})
    seen["children"] = [" ".join(p.cmdline()) for p in psutil.Process().children(recursive=True)]
    print(json.dumps(seen))
