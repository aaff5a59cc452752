"""``_wrapping.patch`` (plain-function hooks) and ``unwrap`` restoring an owner's own
attribute: class methods stay class methods, foreign wrapt layers below and above ours."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import wrapt
from opentelemetry.instrumentation.utils import unwrap as otel_unwrap

from otel_raptor.integrations import _wrapping


def doubling(original: Callable[..., Any]) -> Callable[..., Any]:
    def method(self: Any, x: int) -> int:
        return 2 * int(original(self, x))

    return method


def async_doubling(original: Callable[..., Any]) -> Callable[..., Any]:
    async def method(self: Any, x: int) -> int:
        return 2 * int(await original(self, x))

    return method


def test_patch_is_idempotent_and_unwrap_restores_the_same_function() -> None:
    class Target:
        def method(self, x: int) -> int:
            """The original."""
            return x + 1

    original = Target.__dict__["method"]
    assert _wrapping.patch(Target, "method", doubling)
    assert not _wrapping.patch(Target, "method", doubling)
    assert Target().method(1) == 4
    assert Target.method.__name__ == "method"
    assert Target.method.__doc__ == "The original."
    assert inspect.signature(Target.method) == inspect.signature(original)
    assert _wrapping.is_wrapped(Target, "method", doubling)
    assert _wrapping.unwrap(Target, "method", doubling)
    assert Target.__dict__["method"] is original
    assert not _wrapping.unwrap(Target, "method", doubling)


def test_an_async_patch_keeps_the_method_a_coroutine_function() -> None:
    class Target:
        async def method(self, x: int) -> int:
            return x

    _wrapping.patch(Target, "method", async_doubling)
    assert inspect.iscoroutinefunction(Target.method)
    _wrapping.unwrap(Target, "method", async_doubling)


def test_a_foreign_wrapt_layer_below_sees_its_instance() -> None:
    seen: list[Any] = []

    def foreign(wrapped: Callable[..., Any], instance: Any, args: Any, kwargs: Any) -> Any:
        seen.append(instance)
        return wrapped(*args, **kwargs)

    class Target:
        def method(self, x: int) -> int:
            return x + 1

    wrapt.wrap_function_wrapper(Target, "method", foreign)
    _wrapping.patch(Target, "method", doubling)
    target = Target()
    assert target.method(1) == 4
    assert seen == [target]  # bound, as attribute access would have bound it
    assert _wrapping.unwrap(Target, "method", doubling)
    assert Target().method(1) == 2


def test_unwrap_keeps_a_class_method_a_class_method() -> None:
    class Base:
        @classmethod
        def make(cls) -> type:
            return cls

    class Sub(Base):
        pass

    def wrapper(wrapped: Callable[..., Any], instance: Any, args: Any, kwargs: Any) -> Any:
        return wrapped(*args, **kwargs)

    original = Base.__dict__["make"]
    _wrapping.wrap(Base, "make", wrapper)
    assert Sub.make() is Sub
    assert _wrapping.unwrap(Base, "make", wrapper)
    assert Base.__dict__["make"] is original
    assert Sub.make() is Sub


def test_after_someone_elses_unwrap_above_ours_the_class_method_is_still_restored() -> None:
    """OpenTelemetry's ``unwrap`` of a layer over ours puts our layer back *bound*; ours still
    restores the class method itself."""

    class Base:
        @classmethod
        def make(cls) -> type:
            return cls

    class Sub(Base):
        pass

    def ours(wrapped: Callable[..., Any], instance: Any, args: Any, kwargs: Any) -> Any:
        return wrapped(*args, **kwargs)

    def theirs(wrapped: Callable[..., Any], instance: Any, args: Any, kwargs: Any) -> Any:
        return wrapped(*args, **kwargs)

    original = Base.__dict__["make"]
    _wrapping.wrap(Base, "make", ours)
    wrapt.wrap_function_wrapper(Base, "make", theirs)
    otel_unwrap(Base, "make")
    assert _wrapping.unwrap(Base, "make", ours)
    assert Base.__dict__["make"] is original
    assert Sub.make() is Sub


def test_same_parameters_compares_names_kinds_and_defaults_not_annotations() -> None:
    def method(self, query, params=None, *, prepare=None):  # type: ignore[no-untyped-def]
        return None

    def hook(self: Any, query: str, params: Any = None, *, prepare: Any = None) -> Any:
        return None

    def other_default(self: Any, query: str, params: Any = (), *, prepare: Any = None) -> Any:
        return None

    def keyword_more(
        self: Any, query: str, params: Any = None, *, prepare: Any = None, binary: Any = None
    ) -> Any:
        return None

    def positional_prepare(self: Any, query: str, params: Any = None, prepare: Any = None) -> Any:
        return None

    def varargs(self: Any, *args: Any, **kwargs: Any) -> Any:
        return None

    assert _wrapping.same_parameters(method, hook)
    for shape in (other_default, keyword_more, positional_prepare, varargs):
        assert not _wrapping.same_parameters(method, shape)
    assert not _wrapping.same_parameters(len, hook)  # no signature to read: not the same


def test_a_statement_hook_meeting_another_shape_of_execute_takes_any_arguments() -> None:
    """A driver version whose ``execute`` takes other parameters than the fast lane's gets the
    general hook, which passes whatever it is given."""
    from otel_raptor.integrations.db import psycopg as raptor_psycopg
    from otel_raptor.integrations.db import pymysql as raptor_pymysql

    seen: list[tuple[Any, ...]] = []

    def execute(
        self: Any, query: str, params: Any = None, *, prepare: Any = None, flag: int = 0
    ) -> Any:
        seen.append((query, params, prepare, flag))
        return self

    def pymysql_execute(self: Any, query: str, args: Any = None, extra: int = 0) -> Any:
        seen.append((query, args, extra))
        return self

    hook = raptor_psycopg._execute_hook(execute)
    assert not _wrapping.same_parameters(execute, hook)
    assert hook("cursor", "SELECT 1", (1,), flag=3) == "cursor"  # raptor not installed
    hook = raptor_pymysql._execute_hook(pymysql_execute)
    assert hook("cursor", "SELECT 1", None, 7) == "cursor"
    assert seen == [("SELECT 1", (1,), None, 3), ("SELECT 1", None, 7)]
