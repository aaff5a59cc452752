"""One bound for the async callbacks and actions that the monitor and the predictor run.

:func:`run_bounded` runs a coroutine as a task of its own and waits for it at most ``timeout``
seconds (``asyncio.wait``). Past that it cancels the task and returns at once: it never waits
for the cancellation to land, so a coroutine that swallows ``CancelledError`` (a "clean up on
cancel" handler that awaits, or one that ignores it for good) holds neither the caller nor the
loop. ``asyncio.wait_for`` does wait for it, which is why it is not used here.

The outcome is returned rather than raised, because every caller reports it and carries on:
``None`` (it finished, or it was cancelled by someone else), the exception it raised, or a
:class:`BoundExceeded` when it was cut off.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any

__all__ = ["BoundExceeded", "run_bounded"]


class BoundExceeded(TimeoutError):
    """An async callback or action ran past its bound and was cancelled (not waited for)."""

    def __init__(self, what: str, timeout: float) -> None:
        super().__init__(f"{what} ran for {timeout:g} s; cancelled")
        self.timeout = timeout


async def run_bounded(
    coro: Coroutine[Any, Any, object],
    timeout: float,
    *,
    what: str = "an async callback",
    late: Callable[[BaseException], None] | None = None,
) -> BaseException | None:
    """Run ``coro`` for at most ``timeout`` seconds (real time); never raises what it raises.

    Returns ``None`` when it finished (or was cancelled by someone else), the exception it
    raised, or :class:`BoundExceeded` (naming ``what``) when it ran past ``timeout``: then it
    is cancelled and abandoned, and ``late`` (if given) is called with what it raises on its
    way out, other than its cancellation. When this coroutine itself is cancelled (its loop is
    closing), ``coro`` is cancelled too and the cancellation propagates.
    """
    task = asyncio.ensure_future(coro)
    try:
        done, _ = await asyncio.wait((task,), timeout=timeout)
    except asyncio.CancelledError:
        task.cancel()
        raise
    if done:
        return _outcome(task)
    task.cancel()
    task.add_done_callback(lambda ended: _after_bound(ended, late))
    return BoundExceeded(what, timeout)


def _outcome(task: asyncio.Future[Any]) -> BaseException | None:
    if task.cancelled():
        return None
    return task.exception()


def _after_bound(task: asyncio.Future[Any], late: Callable[[BaseException], None] | None) -> None:
    # Always retrieves the exception, so asyncio never logs "exception was never retrieved".
    error = _outcome(task)
    if error is not None and late is not None:
        late(error)
