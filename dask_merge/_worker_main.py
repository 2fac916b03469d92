"""The ``__main__`` that pool workers see: an empty stand-in for the parent's script.

Workers run this package's functions and nothing of the parent's script.
Yet multiprocessing runs that script again in every worker it spawns or
forks from a fork server (before Python 3.13 even when ``__main__`` is
preloaded: python/cpython#126631).  A pipeline script that imports torch
would pay for it in each worker, and one without an
``if __name__ == "__main__":`` guard would start its whole run again there.

The fork server imports this module before it forks any worker.  It puts a
stand-in under ``__main__`` that carries the parent script's path or module
name, which is all multiprocessing checks before it skips loading the
script (``spawn._fixup_main_from_path`` and ``_fixup_main_from_name``).

:func:`pool_context` starts that fork server.  It lives here, free of Dask,
so that the command line can start the server before it imports the engine.
"""

from __future__ import annotations

import contextlib
import importlib.machinery
import json
import multiprocessing
import os
import sys
import types
from collections.abc import Iterator
from multiprocessing.context import BaseContext

_ENVIRON = "DASK_MERGE_PARENT_MAIN"


@contextlib.contextmanager
def parent_main_announced() -> Iterator[None]:
    """Within this block, a process started from here learns which script is ``__main__``.

    Around the start of the fork server: it inherits the environment then.
    """
    from multiprocessing import spawn

    prepared = spawn.get_preparation_data("dask-merge")  # what workers will be sent
    main = {k: prepared[k] for k in ("init_main_from_path", "init_main_from_name") if k in prepared}
    os.environ[_ENVIRON] = json.dumps(main)
    try:
        yield
    finally:
        os.environ.pop(_ENVIRON, None)


def pool_context() -> BaseContext:
    """The start method of the pool's workers: forked from a clean fork server.

    Never forked from this process: the pipeline may run CUDA here, and a
    notebook has threads.  The fork server (Python's default from 3.14 on)
    starts once per interpreter, without torch or distributed, and imports
    the kernel, numpy and Dask's core.  Workers then start in milliseconds,
    retry pools too.  They never run the parent's ``__main__`` script,
    which spawned workers would each run again.  Where there is no fork
    server (Windows), workers are spawned.

    The first call starts the server, which takes ~0.2 s of one core to
    import: called early, it does so while this process imports and plans.
    """
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    from multiprocessing import forkserver

    context = multiprocessing.get_context("forkserver")
    # Read when the server starts (the first pool of this interpreter), else ignored.
    context.set_forkserver_preload(["dask_merge._worker_main", "dask_merge.tasks", "dask.local"])
    with parent_main_announced():
        forkserver.ensure_running()
    return context


def stand_in(*, init_main_from_path: str | None = None,
             init_main_from_name: str | None = None) -> types.ModuleType:
    """Put an empty module that passes for the parent's script under ``__main__``.

    Only ever in the fork server: the keyword arguments are those of
    :func:`multiprocessing.spawn.get_preparation_data` in the parent.
    """
    main = types.ModuleType("__mp_main__")
    if init_main_from_path is not None:
        main.__file__ = init_main_from_path
    if init_main_from_name is not None:
        main.__spec__ = importlib.machinery.ModuleSpec(init_main_from_name, None)
    sys.modules["__main__"] = sys.modules["__mp_main__"] = main
    return main


if _ENVIRON in os.environ:  # in the fork server, as it starts; never in the parent
    stand_in(**json.loads(os.environ.pop(_ENVIRON)))
