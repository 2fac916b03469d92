"""The pool's fork server, and the ``__main__`` its workers see: a stand-in for the parent's script.

Workers run this package's functions and nothing of the parent's script.
Yet multiprocessing runs that script again in every worker it spawns or
forks from a fork server (before Python 3.13 even when ``__main__`` is
preloaded: python/cpython#126631).  A pipeline script that imports torch
would pay for it in each worker, and one without an
``if __name__ == "__main__":`` guard would start its whole run again there.

The fork server imports this module, last of its preload, before it forks
any worker.  It puts a stand-in under ``__main__`` that shows our workers
the parent script's path or module name, which is all multiprocessing
checks before it skips loading the script (``spawn._fixup_main_from_path``
and ``_fixup_main_from_name``).  The fork server is the interpreter's, not
only ours: the parent's own pools of that start method (the default from
Python 3.14 on) fork from it too.  Their workers are not named as ours
(:class:`PoolProcess`): the stand-in shows them nothing, and they run the
script as multiprocessing always does.

:func:`pool_context` starts that fork server.  It lives here, free of Dask,
so that the pool executor can start the server before it imports Dask.
"""

from __future__ import annotations

import contextlib
import importlib.machinery
import json
import multiprocessing
import os
import signal
import sys
import types
from collections.abc import Iterator
from multiprocessing.context import BaseContext, ForkServerContext, ForkServerProcess

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

    context = _PoolContext()
    # Read when the server starts (the first pool of this interpreter), else
    # ignored.  Added to what the parent preloads itself, but for its script
    # (Python 3.13 on would run it in the server, and so in every worker).
    ours = ["dask_merge.tasks", "dask.local", __name__]  # this one last: it ends the preload
    theirs = getattr(forkserver._forkserver, "_preload_modules", [])
    context.set_forkserver_preload([m for m in theirs if m not in ours and m != "__main__"] + ours)
    # The server's ensure_running starts the resource tracker first, if it is
    # not up, and lets SIGINT in again after that: start it before.
    resource_tracker.ensure_running()
    with _ctrl_c_held() as held, parent_main_announced(release_ctrl_c=held):
        forkserver.ensure_running()
    return context


class PoolProcess(ForkServerProcess):
    """A worker of our pool: named so that the fork server's stand-in ``__main__`` knows it."""

    PREFIX = "dask-merge-worker"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.name = f"{self.PREFIX}-{self.name}"


class _PoolContext(ForkServerContext):
    Process = PoolProcess


@contextlib.contextmanager
def _ctrl_c_held() -> Iterator[bool]:
    """Within this block SIGINT waits in this thread and in a process started from it.

    The fork server ignores Ctrl-C once it has imported its preload.  A
    Ctrl-C before that (a terminal sends it to the whole process group)
    killed it, and the run failed with EOFError instead of stopping cleanly.
    Started with SIGINT blocked, the server holds it until the end of its
    preload and drops it there (:func:`_release_ctrl_c`).  This thread gets
    it as the block ends, a few milliseconds later: no Ctrl-C is lost.
    Another thread of this process may take it meanwhile, and then this one
    raises KeyboardInterrupt inside the block, before the server has
    started or after: it is started again by the next pool, none is lost.
    Yields whether it blocked SIGINT (False if it was blocked already).
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


_PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
"""The folder this package was imported from: the fork server imports it from there too."""
_PATH_VARIABLES = ("PYTHONPATH", "PYTHONSAFEPATH")


@contextlib.contextmanager
def parent_main_announced(*, release_ctrl_c: bool = False) -> Iterator[None]:
    """Around the start of the fork server: what it must learn of this process.

    It inherits the environment then.  It learns which script is
    ``__main__`` here (for its stand-in), and imports this package from
    where this process did.  The server runs ``python -c``, whose first import path is the working
    folder, and it ignores the ``sys_path`` multiprocessing hands it
    (``forkserver.main`` takes the argument and never applies it).  A
    checkout of another version in the working folder would then be what
    the workers run, while this process runs the installed package.  So the
    server starts with this package's folder first on ``PYTHONPATH`` and,
    from Python 3.11 on, ``PYTHONSAFEPATH`` set (no working folder); it puts
    both variables back as they were before it forks a worker.
    """
    from multiprocessing import spawn

    prepared = spawn.get_preparation_data("dask-merge")  # what workers will be sent
    main = {k: prepared[k] for k in ("init_main_from_path", "init_main_from_name") if k in prepared}
    saved = {name: os.environ.get(name) for name in _PATH_VARIABLES}
    os.environ[_ENVIRON] = json.dumps({**main, "release_ctrl_c": release_ctrl_c, "environ": saved})
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, (_PACKAGE_ROOT, saved["PYTHONPATH"])))
    os.environ["PYTHONSAFEPATH"] = "1"
    try:
        yield
    finally:
        os.environ.pop(_ENVIRON, None)
        _restore(saved)


def _restore(environ: dict[str, str | None]) -> None:
    for name, value in environ.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


class _StandIn(types.ModuleType):
    """``__main__`` in the fork server: our workers' empty stand-in for the parent's script.

    Shows the script's path or module name to a process named as our pool's
    workers only, when multiprocessing prepares it (after naming it).
    """

    def __init__(self, path: str | None, name: str | None) -> None:
        super().__init__("__mp_main__")
        self._parent_main = path, name

    @property
    def __file__(self) -> str:
        path, _ = self._parent_main
        if path is None or not _in_our_worker():
            raise AttributeError("__file__")
        return path

    @property
    def __spec__(self):
        _, name = self._parent_main
        if name is None or not _in_our_worker():
            return None
        return importlib.machinery.ModuleSpec(name, None)


def _in_our_worker() -> bool:
    return multiprocessing.current_process().name.startswith(PoolProcess.PREFIX)


def stand_in(*, init_main_from_path: str | None = None,
             init_main_from_name: str | None = None) -> types.ModuleType:
    """Put the stand-in for the parent's script under ``__main__``.

    Only ever in the fork server: the keyword arguments are those of
    :func:`multiprocessing.spawn.get_preparation_data` in the parent.
    """
    main = _StandIn(init_main_from_path, init_main_from_name)
    sys.modules["__main__"] = sys.modules["__mp_main__"] = main
    return main


if _ENVIRON in os.environ:  # in the fork server, at the end of its preload; never in the parent
    _announced = json.loads(os.environ.pop(_ENVIRON))
    _restore(_announced.pop("environ"))
    if _announced.pop("release_ctrl_c"):
        _release_ctrl_c()
    stand_in(**_announced)
