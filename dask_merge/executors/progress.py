"""Progress of a run on a cluster: distributed's widget in a notebook, its text bar elsewhere."""

from __future__ import annotations

import contextlib
import sys


class _Widget:
    """distributed's progress widget, listening on the client's IO loop.

    ``progress(futures, notebook=True)``, the public way, schedules the
    widget's updates on the kernel's event loop (``IOLoop.current()``),
    which the running cell blocks until the run ends: the widget would stay
    empty (a widget that blocks is not supported: dask/distributed#1487).
    A synchronous client runs its own IO loop in a thread, and that one is
    free: the widget's ``listen()`` coroutine runs there.
    """

    def __init__(self, client, futures):
        import asyncio

        from distributed.diagnostics.progressbar import progress
        from IPython.display import display

        self.bar = progress(futures, notebook=True, scheduler=client.scheduler.address)
        display(self.bar.widget)
        self.listening = asyncio.run_coroutine_threadsafe(self.bar.listen(),
                                                          client.loop.asyncio_loop)

    def finish(self, timeout: float = 10) -> None:
        """Wait for the widget's last update (every task has ended by now)."""
        import concurrent.futures

        try:
            self.listening.result(timeout)
        except concurrent.futures.TimeoutError:
            self.listening.cancel()
        except Exception:  # the scheduler went away: the widget shows what it saw
            pass


def show_progress(client, futures) -> _Widget | None:
    """In a notebook, display the progress widget and return it; elsewhere, draw a
    text bar until every task has ended (and return None)."""
    from distributed.diagnostics.progressbar import progress
    from distributed.utils import is_kernel

    if is_kernel() and not client.asynchronous:
        with contextlib.suppress(ImportError):  # no ipywidgets: the text bar
            return _Widget(client, futures)
    # The bar is progress, not a result: stderr.  distributed draws it on
    # sys.stdout, from its IO loop's thread, while this one waits for it.
    with contextlib.redirect_stdout(sys.stderr):
        progress(futures, notebook=False, scheduler=client.scheduler.address)
    return None
