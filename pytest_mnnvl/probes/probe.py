"""The record every probe answers with, and the cache every probe sits behind.

A probe answers with a value *and* a human reason (why, and how to get what is missing), so a skip or a
report header can say what to do, not only that something is missing. Each probe runs once per process:
:func:`reset_cache` forgets every answer (tests, or after changing the environment).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class Probe(Generic[T]):
    """The answer of one probe: ``value`` (``None`` where a tri-state answer could not be found)
    and ``reason``, a sentence saying why, and what to do when something is missing."""

    value: T
    reason: str


_CACHED: list[Any] = []
_F = TypeVar("_F", bound=Callable[..., Any])


def _cached(fn: _F) -> _F:
    wrapped = functools.cache(fn)
    _CACHED.append(wrapped)
    return wrapped  # type: ignore[return-value]


def reset_cache() -> None:
    """Forget every cached probe result (tests, or after changing the environment)."""
    for fn in _CACHED:
        fn.cache_clear()
