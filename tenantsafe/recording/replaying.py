"""Replaying a recording into a new schema, and the search path a replay pins."""

from __future__ import annotations

import contextlib
import logging
import time
import uuid
from collections.abc import Iterator
from typing import Any

from django.db import DatabaseError, connections, transaction

from tenantsafe import citus, guard, tenants
from tenantsafe.errors import ReplayMismatch, sqlstate
from tenantsafe.recording.fingerprints import fingerprint
from tenantsafe.recording.store import RecordingStore

logger = logging.getLogger("tenantsafe.recording")


def pinned_path(alias: str, schema: str, tenant_type: str) -> list[str]:
    """The search path a replay pins for ``schema``: the path its migration ran with (the
    schema, then public and any extra paths)."""
    connection: Any = connections[alias]
    connection.set_schema(schema, tenant_type=tenant_type or None)
    try:
        return guard.search_path(connection)
    finally:
        connection.set_schema_to_public()


@contextlib.contextmanager
def in_scratch(alias: str, tenant_type: str, sql: str) -> Iterator[tuple[Any, str]]:
    """A raw cursor, and the name of the new schema ``sql`` was replayed into, with that
    schema's path pinned; in a transaction that is rolled back after the block."""
    scratch = f"tenantsafe_scratch_{uuid.uuid4().hex[:12]}"
    path = pinned_path(alias, scratch, tenant_type)
    with guard.pinned_transaction(alias, path, create=True) as cursor:
        try:
            citus.execute_batch(connections[alias], cursor, sql)
            yield cursor, scratch
        finally:
            transaction.set_rollback(True, using=alias)


def replay(store: RecordingStore, tenant: Any) -> bool:
    """Create ``tenant``'s schema from the recording in ``store`` for the current state, if
    there is a usable one, in one transaction (a savepoint inside the caller's). False when
    there is none, or when replaying it failed or left a schema unlike the recorded one: then
    nothing of it is kept, the recording is discarded, and the schema is to be migrated."""
    alias = store.alias
    schema = tenant.schema_name
    tenant_type = tenants.tenant_type(tenant)
    recording = store.get(tenant_type)
    if recording is None or recording.problem:
        return False
    started = time.perf_counter()
    path = pinned_path(alias, schema, tenant_type)
    try:
        # Through a transaction pooler the batch runs on the server connection checked.
        with guard.pinned_transaction(alias, path, create=True) as cursor:
            # One round trip: the statements as one multi-statement query (on Citus, one
            # pipeline of them).
            citus.execute_batch(connections[alias], cursor, recording.sql)
            if fingerprint(cursor, schema) != recording.fingerprint:
                raise ReplayMismatch(schema=schema)
    except ReplayMismatch:
        store.discard(
            recording.state,
            tenant_type,
            f"replaying it into {schema} left a schema unlike the recorded one",
        )
        return False
    except DatabaseError as exc:
        if sqlstate(exc) == "42P06" or citus.unreachable_node(exc):
            # The schema appeared meanwhile (another process provisioned it), or a Citus node
            # could not be reached (or was restarted since this session last used it): not
            # the recording's fault.
            return False
        # Something in the recording depends on more than the schema (a row a data
        # migration read in public, say): stop trusting it and migrate instead.
        store.discard(recording.state, tenant_type, f"replaying it into {schema} failed: {exc}")
        return False
    logger.debug(
        "schema %s: replayed %d characters of SQL in %.1f ms",
        schema,
        len(recording.sql),
        (time.perf_counter() - started) * 1000,
    )
    return True
