"""The fork-safety registry's own lock, held by another thread across a fork (real threads,
the fork handlers called directly: no fork is needed to see whose hold the parent frees)."""

from __future__ import annotations

import threading

import pytest

from otel_raptor.runtime import forksafe


def test_the_parent_never_releases_a_registry_lock_another_thread_holds(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The parent's after-fork handler used to release it anyway (a Lock does not check its
    # owner): the holder's own release then raised "release unlocked lock" into its caller.
    monkeypatch.setattr(forksafe, "ACQUIRE_TIMEOUT_S", 0.01)
    taken, done = threading.Event(), threading.Event()
    errors: list[BaseException] = []

    def holder() -> None:
        try:
            with forksafe._registry_lock:
                taken.set()
                done.wait(5)
        except BaseException as error:  # reported to the test
            errors.append(error)

    thread = threading.Thread(target=holder)
    thread.start()
    try:
        assert taken.wait(5)
        forksafe._before_fork()  # gives up on the busy registry
        forksafe._after_fork_in_parent()
        assert forksafe._registry_lock.locked()  # still the holder's
    finally:
        done.set()
        thread.join(5)
    assert errors == []
    assert not forksafe._registry_lock.locked()
