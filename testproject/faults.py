"""Fault-injection hooks for tests, driven by environment variables; inert when they are unset.

``TESTPROJECT_HOLD=<dir>:<point>:<schema>`` holds the migration of ``<schema>`` at ``<point>``:
it writes ``<dir>/held`` (JSON: this process's pid and the migrating connection's backend pid)
and waits until ``<dir>/go`` exists. Points:

- ``pre_migrate``: the first pre_migrate receiver of the schema's migrate run (connected in
  ``CustomersConfig.ready()``): the run holds the schema's lease, and no migration of it has
  run yet.
- ``post_migrate``: the first post_migrate receiver of the schema's migrate run (connected in
  ``CustomersConfig.ready()``, before contenttypes' and auth's): every migration is recorded,
  no content type or permission is created yet.
- ``seed``: inside shop 0002's RunPython, in that atomic migration's transaction.

Only the first arrival in a process holds, so a run that goes on afterwards is not held again.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

_held = False


def hold(point: str, connection: Any) -> None:
    global _held
    spec = os.environ.get("TESTPROJECT_HOLD")
    if not spec or _held:
        return
    directory, wanted_point, schema = spec.split(":", 2)
    if point != wanted_point or connection.schema_name != schema:
        return
    _held = True
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        backend_pid = cursor.fetchone()[0]
    here = Path(directory)
    tmp = here / "held.tmp"
    tmp.write_text(json.dumps({"pid": os.getpid(), "backend_pid": backend_pid}))
    tmp.rename(here / "held")
    # TESTPROJECT_HOLD_TIMEOUT: shorter for the mutation check (bench/mutants.py), where a
    # broken run may never be let go.
    deadline = time.monotonic() + float(os.environ.get("TESTPROJECT_HOLD_TIMEOUT", "120"))
    while not (here / "go").exists():
        if time.monotonic() > deadline:
            raise RuntimeError(f"TESTPROJECT_HOLD: {point} in {schema} never released")
        time.sleep(0.05)


def on_pre_migrate(sender: Any, using: str = "default", **kwargs: Any) -> None:
    from django.db import connections

    hold("pre_migrate", connections[using])


def on_post_migrate(sender: Any, using: str = "default", **kwargs: Any) -> None:
    from django.db import connections

    hold("post_migrate", connections[using])


def fail_seed(schema: str) -> bool:
    """TESTPROJECT_FAIL_SEED: one schema's name, or ``*`` for every schema."""
    wanted = os.environ.get("TESTPROJECT_FAIL_SEED")
    return bool(wanted) and wanted in ("*", schema)
