"""A small in-process event bus: publishers never see a subscriber's failure."""

from __future__ import annotations

import threading
from collections.abc import Callable

from otel_raptor.core.events import Event
from otel_raptor.runtime.forksafe import register_lock
from otel_raptor.runtime.safety import report_internal_error

__all__ = ["EventBus", "Subscriber"]

Subscriber = Callable[[Event], None]


class EventBus:
    """Fans each published event out to the subscribers, synchronously, in order.

    Subscribing replaces the tuple of subscribers (copy on write), so ``publish`` reads it
    without a lock. A subscriber that raises is reported once and skipped for that event;
    the publisher never sees the error.
    """

    __slots__ = ("__weakref__", "_lock", "_subscribers")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        register_lock(self, "_lock")
        self._subscribers: tuple[Subscriber, ...] = ()

    def subscribe(self, subscriber: Subscriber) -> Callable[[], None]:
        """Add ``subscriber``; returns a function that removes it again."""
        with self._lock:
            self._subscribers = (*self._subscribers, subscriber)

        def unsubscribe() -> None:
            with self._lock:
                self._subscribers = tuple(s for s in self._subscribers if s is not subscriber)

        return unsubscribe

    @property
    def has_subscribers(self) -> bool:
        return bool(self._subscribers)

    def publish(self, event: Event) -> None:
        for subscriber in self._subscribers:
            try:
                subscriber(event)
            except Exception as exc:  # noqa: BLE001 - a subscriber must not break a call
                report_internal_error(f"event subscriber {_name(subscriber)}", exc)


def _name(subscriber: Subscriber) -> str:
    """The subscriber's own name (a bound method's ``TelemetrySink.publish``), not its type's:
    every bound method's type is ``method``, and failures are reported once per name."""
    name = getattr(subscriber, "__qualname__", None)
    return name if isinstance(name, str) else type(subscriber).__qualname__
