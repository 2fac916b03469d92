"""The pool's fork server, and the ``__main__`` its workers see: a stand-in for the parent's script.

Workers run this package's functions and nothing of the parent's script.
Yet multiprocessing runs that script again in every worker it spawns or
forks from a fork server (before Python 3.13 even when ``__main__`` is
preloaded: python/cpython#126631).  A pipeline script that imports torch
would pay for it in each worker, and one without an
``if __name__ == "__main__":`` guard would start its whole run again there.

The fork server imports this module, last of its preload, before it forks
any worker.  It puts a stand-in under ``__main__`` that carries the parent
script's path or module name, which is all multiprocessing checks before it
skips loading the script (``spawn._fixup_main_from_path`` and
``_fixup_main_from_name``).  The fork server is the interpreter's, not only
ours: the parent's own pools of that start method (the default from Python
3.14 on) fork from it too, and pickle the script's functions by name.  So
the stand-in runs the script, as multiprocessing would have, when a name
is first looked up in it; our workers never look one up.

:func:`pool_context` starts that fork server.  It lives here, free of Dask,
so that the command line can start the server before it imports the engine.
"""

from __future__ import annotations

import contextlib
import importlib.machinery
import json
import multiprocessing
import os
import runpy
import signal
import sys
import types
from collections.abc import Iterator
from multiprocessing.context import BaseContext

_ENVIRON = "DASK_MERGE_PARENT_MAIN"


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
    from multiprocessing import forkserver, resource_tracker

    context = multiprocessing.get_context("forkserver")
    # Read when the server starts (the first pool of this interpreter), else ignored.
    context.set_forkserver_preload(["dask_merge.tasks", "dask.local", __name__])
    # The server's ensure_running starts the resource tracker first, if it is
    # not up, and lets SIGINT in again after that: start it before.
    resource_tracker.ensure_running()
    with _ctrl_c_held() as held, parent_main_announced(release_ctrl_c=held):
        forkserver.ensure_running()
    return context


@contextlib.contextmanager
def _ctrl_c_held() -> Iterator[bool]:
    """Within this block SIGINT waits, here and in a process started from here.

    The fork server ignores Ctrl-C once it has imported its preload.  A
    Ctrl-C before that (a terminal sends it to the whole process group)
    killed it, and the run failed with EOFError instead of stopping cleanly.
    Started with SIGINT blocked, the server holds it until the end of its
    preload and drops it there (:func:`_release_ctrl_c`).  Here it is
    delivered as the block ends, a few milliseconds later: no Ctrl-C is
    lost.  Yields whether it blocked SIGINT (False if it was blocked already).
    """
    before = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield signal.SIGINT not in before
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, before)


def _release_ctrl_c() -> None:
    """In the fork server, at the end of its preload: drop a held Ctrl-C, let SIGINT in again."""
    handler = signal.signal(signal.SIGINT, signal.SIG_IGN)  # which discards a pending SIGINT
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    signal.signal(signal.SIGINT, handler)


@contextlib.contextmanager
def parent_main_announced(*, release_ctrl_c: bool = False) -> Iterator[None]:
    """Within this block, a process started from here learns which script is ``__main__``.

    Around the start of the fork server: it inherits the environment then.
    """
    from multiprocessing import spawn

    prepared = spawn.get_preparation_data("dask-merge")  # what workers will be sent
    main = {k: prepared[k] for k in ("init_main_from_path", "init_main_from_name") if k in prepared}
    os.environ[_ENVIRON] = json.dumps({**main, "release_ctrl_c": release_ctrl_c})
    try:
        yield
    finally:
        os.environ.pop(_ENVIRON, None)


def stand_in(*, init_main_from_path: str | None = None,
             init_main_from_name: str | None = None) -> types.ModuleType:
    """Put a module that passes for the parent's script under ``__main__``.

    Only ever in the fork server: the keyword arguments are those of
    :func:`multiprocessing.spawn.get_preparation_data` in the parent.  The
    module is empty until a name is looked up in it: then it runs the
    script as ``__mp_main__``, as multiprocessing would have done at start.
    """
    main = types.ModuleType("__mp_main__")
    if init_main_from_path is not None:
        main.__file__ = init_main_from_path
    if init_main_from_name is not None:
        main.__spec__ = importlib.machinery.ModuleSpec(init_main_from_name, None)

    def __getattr__(name: str):  # PEP 562: looked up when a name is missing
        # Dunder look-ups are a library probing, not a pickled function.
        runnable = not (name.startswith("__") and name.endswith("__"))
        if runnable and main.__dict__.pop("__getattr__", None) is not None:  # once
            main.__dict__.update(_run_script(init_main_from_path, init_main_from_name))
            if name in main.__dict__:
                return main.__dict__[name]
        raise AttributeError(f"module '__main__' has no attribute {name!r}")

    main.__getattr__ = __getattr__
    sys.modules["__main__"] = sys.modules["__mp_main__"] = main
    return main


def _run_script(path: str | None, name: str | None) -> dict:
    """The namespace of the parent's script run as ``__mp_main__``, as multiprocessing runs it."""
    if name is not None:
        # multiprocessing never runs a package's __main__ again (spawn._fixup_main_from_name).
        if name == "__main__" or name.endswith(".__main__"):
            return {}
        return runpy.run_module(name, run_name="__mp_main__", alter_sys=True)
    if path is None or os.path.splitext(os.path.basename(path))[0] == "ipython":
        return {}  # multiprocessing leaves IPython's alone, too
    return runpy.run_path(path, run_name="__mp_main__")


if _ENVIRON in os.environ:  # in the fork server, at the end of its preload; never in the parent
    _announced = json.loads(os.environ.pop(_ENVIRON))
    if _announced.pop("release_ctrl_c"):
        _release_ctrl_c()
    stand_in(**_announced)
