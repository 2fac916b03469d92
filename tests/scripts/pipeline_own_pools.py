"""A pipeline that uses fork-server pools of its own after a run.

Run as a copy, ``pipeline.py``, by path or with ``-m``, with FEATURES, OUT and RAN set:
it appends its process id to RAN in every process that runs it, merges,
then runs its own pools and prints as JSON what they did.
"""

import json
import multiprocessing
import os
import signal

import dask_merge

features, out, ran = os.environ["FEATURES"], os.environ["OUT"], os.environ["RAN"]
with open(ran, "a") as f:
    f.write(f"{os.getpid()}\n")


def square(x):
    return x * x


def ctrl_c_as_usual(_):
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, set())
    return signal.getsignal(signal.SIGINT) is signal.default_int_handler and not blocked


if __name__ == "__main__":
    multiprocessing.set_forkserver_preload(["xml.dom.minidom"])  # added to, not replaced
    report = dask_merge.run(features, output_dir=out, scheduler="processes", workers=2,
                            progress=False)
    seen = {"counts": report.counts, "parent": os.getpid()}
    with multiprocessing.get_context("forkserver").Pool(2) as pool:  # using no name of the script
        seen["workers"] = sorted({pool.apply(os.getpid) for _ in range(8)})
        seen["preloaded"] = pool.apply(eval, ("'xml.dom.minidom' in __import__('sys').modules",))
    with open(ran) as f:
        seen["ran"] = f.read().split()  # by now
    with multiprocessing.get_context("forkserver").Pool(2) as pool:
        seen["squares"] = pool.map(square, [1, 2, 3])
        seen["ctrl_c"] = pool.map(ctrl_c_as_usual, [0, 1])
    print(json.dumps(seen))
