"""The migration state key, and what is recorded for a state.

A recording is used only for the state it was taken in: :func:`state_key` digests everything a
fresh schema's migration depends on, and a :class:`Recording` is looked up by it.
"""

from __future__ import annotations

import hashlib
import os
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass

from django.conf import settings
from django.db.migrations.loader import MigrationLoader

from tenantsafe import registry

# Changes when what a recording holds or how it is fingerprinted changes: a recording made by
# another version is never used.
FORMAT = "3"


@dataclass(frozen=True)
class Recording:
    state: str
    tenant_type: str
    # The statements, parameters bound, as one multi-statement string.
    sql: str
    # The catalog fingerprint (a digest) of the schema the statements were recorded from.
    fingerprint: str
    # Why the recording cannot be replayed; empty when it can.
    problem: str = ""


# state_key() builds Django's MigrationLoader, which imports every app's migrations (and
# re-runs their packages): a few ms a call, tens of ms the first time in a process, at every
# provisioning. So each process keeps its answer while nothing it came from can have changed:
# the settings and apps the loader reads, sys.path, the migration files (an edit changes the
# file's mtime) and the directories they are listed from, and the ones holding those (a file
# or package added, removed or renamed changes its directory's mtime). Nothing modified in
# the last _RACY seconds is kept: a second change within the filesystem's timestamp
# granularity could leave the same stat. Where it cannot tell (a top-level migrations module,
# one that is not imported), it computes the key every time.

_RACY = 2.0
_Stats = tuple[tuple[str, tuple[int, int, int, int]], ...]
# The inputs -> (the key, the stats of what it was computed from).
_states: dict[tuple[str, ...], tuple[str, _Stats]] = registry.cache("tenantsafe.recording.state")


def state_key(alias: str, tenant_type: str = "") -> str:
    """A digest of everything a fresh schema's migration depends on.

    Every migration the loader finds on disk (so a new, removed or edited migration file
    changes it), which apps migrate into tenant schemas, and the routers. Not the database's
    name: xdist workers' test databases share it.
    """
    inputs = _state_inputs(alias, tenant_type)
    known = _states.get(inputs)
    if known is not None and _stats(path for path, _ in known[1]) == known[1]:
        return known[0]
    started = time.time()
    loader = MigrationLoader(None, ignore_no_migrations=True)
    digest = hashlib.sha256()
    for part in (
        FORMAT,
        alias,
        tenant_type,
        repr(list(getattr(settings, "TENANT_APPS", []))),
        repr(getattr(settings, "TENANT_TYPES", None)),
        repr(list(getattr(settings, "DATABASE_ROUTERS", []))),
    ):
        digest.update(part.encode() + b"\0")
    for key in sorted(loader.disk_migrations):
        migration = loader.disk_migrations[key]
        digest.update(repr(key).encode() + b"\0")
        digest.update(_source(type(migration).__module__) + b"\0")
    state = digest.hexdigest()
    paths = _watched(loader)
    watched = _stats(paths) if paths is not None else None
    if watched is not None and all(
        max(stat[0], stat[1]) < (started - _RACY) * 1e9 for _, stat in watched
    ):
        _states[inputs] = (state, watched)
    return state


def _state_inputs(alias: str, tenant_type: str) -> tuple[str, ...]:
    from django.apps import apps

    return (
        alias,
        tenant_type,
        repr(list(getattr(settings, "TENANT_APPS", []))),
        repr(getattr(settings, "TENANT_TYPES", None)),
        repr(list(getattr(settings, "DATABASE_ROUTERS", []))),
        repr(getattr(settings, "MIGRATION_MODULES", {})),
        repr([(config.label, config.name) for config in apps.get_app_configs()]),
        repr(sys.path),
    )


def _watched(loader: MigrationLoader) -> list[str] | None:
    """The files and directories whose change can change what ``loader`` found; None when
    that is not known."""
    from django.apps import apps

    paths: set[str] = set()
    for config in apps.get_app_configs():
        name, _ = MigrationLoader.migrations_module(config.label)
        if name is None:
            continue
        parent = sys.modules.get(name.rpartition(".")[0])
        if parent is None or not hasattr(parent, "__path__"):
            return None
        paths.update(parent.__path__)
        module = sys.modules.get(name)
        paths.update(getattr(module, "__path__", ()))
        file = getattr(module, "__file__", None)
        if file:
            paths.add(str(file))
    for migration in loader.disk_migrations.values():
        path = getattr(sys.modules.get(type(migration).__module__), "__file__", None)
        if not path:
            return None
        paths.add(path)
    return sorted(paths)


def _stats(paths: Iterable[str]) -> _Stats | None:
    found = []
    for path in paths:
        try:
            info = os.stat(path)
        except OSError:
            return None
        found.append((path, (info.st_mtime_ns, info.st_ctime_ns, info.st_size, info.st_ino)))
    return tuple(found)


def _source(module_name: str) -> bytes:
    path = getattr(sys.modules.get(module_name), "__file__", None)
    if not path:
        return module_name.encode()
    try:
        with open(path, "rb") as handle:
            return handle.read()
    except OSError:
        return module_name.encode()
