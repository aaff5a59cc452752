"""Fork safety: every lock and background thread of otel_raptor, put right in a forked child.

gunicorn and multiprocessing fork. Only the forking thread survives in the child, so a lock
that another thread held at that moment would stay held forever, and every background thread
is gone. Two mechanisms, one registry:

* :func:`register_lock` ``(owner, "attribute")``: the lock is **acquired before the fork**
  (so no other thread is half-way through the state it protects, and the child sees it whole),
  released after it in the parent, and replaced by a fresh lock in the child. Each acquisition
  waits at most :data:`ACQUIRE_TIMEOUT_S`: a lock held across the fork by the forking thread
  itself, or by a thread that never lets go, is skipped rather than deadlocking the fork, and
  still replaced in the child.
* :func:`after_fork_in_child` ``(owner, reset)``: ``reset(owner)`` runs in the child after the
  locks are replaced (restart a background thread, forget a per-process secret, ...).

Owners are held weakly. Registration order is acquisition order; our locks are never nested,
and a bounded wait breaks any cycle anyway. A failing reset is reported, never raised: a fork
must not fail because of us.
"""

from __future__ import annotations

import contextlib
import os
import threading
import weakref
from collections.abc import Callable
from typing import Any, Final, TypeVar

__all__ = ["ACQUIRE_TIMEOUT_S", "LockBox", "after_fork_in_child", "register_lock"]

#: Longest wait for one lock before a fork (seconds).
ACQUIRE_TIMEOUT_S: Final = 0.5

T = TypeVar("T")

_registry_lock = threading.Lock()
# (owner, attribute) pairs and (owner, reset) pairs, owners held weakly. Owners that cannot be
# weakly referenced are held strongly (module-level singletons).
_locks: list[tuple[Callable[[], Any], str]] = []
_resets: list[tuple[Callable[[], Any], Callable[[Any], None]]] = []
_held: list[Any] = []
# Whether the forking thread took ``_registry_lock`` in ``_before_fork``: only then may it
# release it. A ``threading.Lock`` released by a thread that does not hold it raises nothing:
# it would free another thread's hold, and that thread's own release would then raise
# "release unlocked lock" into whatever it was doing (a guard's construction, a call).
_registry_taken = False
# Every this many registrations the lists drop their dead entries.
_COMPACT_EVERY: Final = 1024
_since_compact = 0


def _ref(owner: object) -> Callable[[], Any]:
    try:
        return weakref.ref(owner)
    except TypeError:
        return lambda: owner


def register_lock(owner: object, attribute: str) -> None:
    """Keep ``owner.<attribute>`` (a ``threading.Lock`` or ``RLock``) consistent across
    ``os.fork()`` (see the module docstring)."""
    with _registry_lock:
        _compact()
        _locks.append((_ref(owner), attribute))


def after_fork_in_child(owner: T, reset: Callable[[T], None]) -> None:
    """Call ``reset(owner)`` in a forked child, while ``owner`` is alive."""
    with _registry_lock:
        _compact()
        _resets.append((_ref(owner), reset))


class LockBox:
    """A registered lock for module-level state: ``_box = LockBox()``, then
    ``with _box.lock:``. (A module global cannot be registered by owner and name.)"""

    __slots__ = ("__weakref__", "lock")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        register_lock(self, "lock")


def _compact() -> None:
    global _since_compact  # noqa: PLW0603 - the registry's own bookkeeping
    _since_compact += 1
    if _since_compact < _COMPACT_EVERY:
        return
    _since_compact = 0
    _locks[:] = [(ref, name) for ref, name in _locks if ref() is not None]
    _resets[:] = [(ref, reset) for ref, reset in _resets if ref() is not None]


def _before_fork() -> None:
    global _registry_taken  # noqa: PLW0603 - the registry's own bookkeeping
    # Taken in the forking thread and released in both processes after the fork.
    if not _registry_lock.acquire(timeout=ACQUIRE_TIMEOUT_S):
        return
    _registry_taken = True
    for ref, name in _locks:
        owner = ref()
        if owner is None:
            continue
        lock = getattr(owner, name, None)
        with contextlib.suppress(Exception):  # never fail a fork
            if lock is not None and lock.acquire(timeout=ACQUIRE_TIMEOUT_S):
                _held.append(lock)


def _release_held() -> None:
    global _registry_taken  # noqa: PLW0603 - the registry's own bookkeeping
    for lock in reversed(_held):
        with contextlib.suppress(Exception):
            lock.release()
    _held.clear()
    if _registry_taken:  # else another thread held it at the fork, and still does
        _registry_taken = False
        with contextlib.suppress(RuntimeError):
            _registry_lock.release()


def _after_fork_in_parent() -> None:
    _release_held()


def _after_fork_in_child() -> None:
    global _registry_lock, _registry_taken  # noqa: PLW0603 - a lock held across the fork is replaced
    _held.clear()
    _registry_taken = False
    _registry_lock = threading.Lock()
    for ref, name in _locks:
        owner = ref()
        if owner is None:
            continue
        lock = getattr(owner, name, None)
        with contextlib.suppress(Exception):
            setattr(owner, name, threading.RLock() if _is_rlock(lock) else threading.Lock())
    for ref, reset in list(_resets):
        owner = ref()
        if owner is None:
            continue
        try:
            reset(owner)
        except Exception as error:  # noqa: BLE001 - a fork must not fail because of us
            _report(error)


def _is_rlock(lock: object) -> bool:
    return type(lock).__name__ in ("RLock", "_RLock")


def _report(error: BaseException) -> None:
    from otel_raptor.runtime.safety import report_internal_error  # noqa: PLC0415 - no cycle

    report_internal_error("forksafe.after_fork_in_child", error)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(
        before=_before_fork,
        after_in_parent=_after_fork_in_parent,
        after_in_child=_after_fork_in_child,
    )
