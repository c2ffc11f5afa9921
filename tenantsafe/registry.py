"""The process-wide caches tenantsafe keeps, in one registry that tests can reset.

A cache here only saves work: what a function answers never depends on whether it was asked
before, and :func:`reset` (called between tests) empties every cache at once. A module asks for
its cache once, at import, and mutates it; it never rebinds a module global.
"""

from __future__ import annotations

from typing import Any

_caches: dict[str, dict[Any, Any]] = {}


def cache(name: str) -> dict[Any, Any]:
    """The cache called ``name`` (a dotted module path and what it holds), made on first use."""
    return _caches.setdefault(name, {})


def reset() -> None:
    """Empty every cache (as a new process would start)."""
    for entries in _caches.values():
        entries.clear()
