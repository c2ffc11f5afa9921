"""Spare schemas: tenant schemas provisioned ahead, which a signup claims with a rename.

A spare is a schema ``tenantsafe_spare_<hex>`` replayed (``tenantsafe.recording``) from the
recording of the current migration state, and registered in ``public.tenantsafe_spare`` (created
on first use) with that state, in one transaction. A claim runs in one transaction too (a
savepoint inside the caller's): it deletes one spare's row of the current state (``FOR UPDATE
SKIP LOCKED``, so two signups never get the same one), renames the schema to the tenant's, and
compares the renamed schema's fingerprint with the recording's. On a difference it rolls back,
drops that spare, and the tenant is replayed or migrated instead.

A spare of another migration state is never claimed; :func:`fill` drops those before it makes
new ones.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass, field
from typing import Any

from django.db import DatabaseError, connections, transaction
from django_tenants.utils import (
    get_multi_type_database_field_name,
    get_tenant_model,
)

from tenantsafe import guard, own_tables, recording, schemas, tenants
from tenantsafe.errors import ReplayMismatch

logger = logging.getLogger("tenantsafe.spares")

TABLE = "tenantsafe_spare"
PREFIX = "tenantsafe_spare_"


@dataclass(frozen=True)
class Filled:
    """What :func:`fill` did."""

    wanted: int
    # Spares of the current state afterwards.
    ready: int
    made: list[str] = field(default_factory=list)
    # Spares of another migration state (or tenant type's state) that were dropped.
    dropped: list[str] = field(default_factory=list)
    # Why no (more) spares could be made; empty when ``ready >= wanted``.
    problem: str = ""


def is_spare(schema: str) -> bool:
    return schema.startswith(PREFIX)


def table() -> str:
    return own_tables.qualified(TABLE)


def ensure_table(alias: str) -> None:
    own_tables.ensure(
        alias,
        TABLE,
        "schema_name text PRIMARY KEY, state text NOT NULL, tenant_type text NOT NULL, "
        "created_at timestamptz NOT NULL DEFAULT now()",
    )


def _table_exists(alias: str) -> bool:
    return own_tables.exists(alias, TABLE)


# Filling.


def fill(store: recording.RecordingStore, count: int, tenant_type: str = "") -> Filled:
    """Make spares until ``count`` of the current migration state exist, after dropping those
    of other states. Needs a usable recording of the current state in ``store`` (else
    ``problem`` says so); several fills at once make no more than ``count`` between them."""
    alias = store.alias
    ensure_table(alias)
    state = store.state(tenant_type)
    dropped = _drop_stale(alias, state, tenant_type)
    ready = _count(alias, state, tenant_type)
    if ready >= count:
        return Filled(count, ready, dropped=dropped)
    found = store.get(tenant_type, state=state)
    if found is None or found.problem:
        why = found.problem if found is not None else "nothing is recorded for it"
        return Filled(
            count,
            ready,
            dropped=dropped,
            problem=f"the current migration state cannot be replayed ({why}), so no spare "
            "schema can be made for it",
        )
    made: list[str] = []
    while True:
        name, ready = _make_one(store, state, tenant_type, count)
        if name is None:
            return Filled(count, ready, made, dropped)
        if not name:
            return Filled(
                count,
                ready,
                made,
                dropped,
                problem="replaying the recording failed (see the warning above); new tenants "
                "are migrated",
            )
        made.append(name)


def _count(alias: str, state: str, tenant_type: str) -> int:
    with connections[alias].cursor() as cursor:
        cursor.execute(
            f"SELECT count(*) FROM {table()} WHERE state = %s AND tenant_type = %s",  # noqa: S608
            [state, tenant_type],
        )
        return int(cursor.fetchone()[0])


def _make_one(
    store: recording.RecordingStore, state: str, tenant_type: str, count: int
) -> tuple[str | None, int]:
    """(the new spare's name, how many are ready); None when enough exist, "" when the replay
    failed."""
    alias = store.alias
    connection: Any = connections[alias]
    connection.set_schema_to_public()
    with transaction.atomic(using=alias):
        with connection.cursor() as cursor:
            # Serializes fills (not claims): each counts what the others made.
            own_tables.lock(cursor, own_tables.SPARES_LOCK, tenant_type)
        ready = _count(alias, state, tenant_type)
        if ready >= count:
            return None, ready
        name = f"{PREFIX}{uuid.uuid4().hex[:16]}"
        if not recording.replay(store, _placeholder(name, tenant_type)):
            return "", ready
        connection.set_schema_to_public()
        with connection.cursor() as cursor:
            # The same transaction as the schema: a spare without its row cannot be left.
            cursor.execute(
                f"INSERT INTO {table()} (schema_name, state, tenant_type) "  # noqa: S608
                "VALUES (%s, %s, %s)",
                [name, state, tenant_type],
            )
    logger.info("made spare schema %s", name)
    return name, ready + 1


def _placeholder(schema: str, tenant_type: str) -> Any:
    tenant = get_tenant_model()(schema_name=schema)
    if tenant_type:
        setattr(tenant, get_multi_type_database_field_name(), tenant_type)
    return tenant


def _drop_stale(alias: str, state: str, tenant_type: str) -> list[str]:
    connection: Any = connections[alias]
    connection.set_schema_to_public()
    with transaction.atomic(using=alias), connection.cursor() as cursor:
        cursor.execute(
            f"DELETE FROM {table()} WHERE schema_name IN (SELECT schema_name "  # noqa: S608
            f"FROM {table()} WHERE tenant_type = %s AND state <> %s FOR UPDATE SKIP LOCKED) "
            "RETURNING schema_name",
            [tenant_type, state],
        )
        dropped = sorted(row[0] for row in cursor.fetchall())
        for name in dropped:
            cursor.execute("DROP SCHEMA IF EXISTS %s CASCADE" % schemas.quote(name))
    if dropped:
        logger.info("dropped spare schemas of another migration state: %s", ", ".join(dropped))
    return dropped


def _drop(alias: str, spare: str) -> None:
    connection: Any = connections[alias]
    connection.set_schema_to_public()
    with transaction.atomic(using=alias), connection.cursor() as cursor:
        cursor.execute(
            f"DELETE FROM {table()} WHERE schema_name IN (SELECT schema_name "  # noqa: S608
            f"FROM {table()} WHERE schema_name = %s FOR UPDATE SKIP LOCKED) RETURNING 1",
            [spare],
        )
        if cursor.fetchone() is not None:
            cursor.execute("DROP SCHEMA IF EXISTS %s CASCADE" % schemas.quote(spare))


# Claiming.

_CLAIM = (
    "DELETE FROM {table} WHERE schema_name = (SELECT schema_name FROM {table} "
    "WHERE state = %s AND tenant_type = %s ORDER BY created_at LIMIT 1 FOR UPDATE SKIP LOCKED) "
    "RETURNING schema_name"
)


def claim(store: recording.RecordingStore, tenant: Any) -> bool:
    """Give ``tenant`` a spare of the current migration state as its schema, if there is one
    that matches the recording in ``store``. False when there is none (or the one taken did
    not match: then it is dropped); nothing is changed then."""
    alias = store.alias
    if not _table_exists(alias):
        return False
    schema = tenant.schema_name
    tenant_type = tenants.tenant_type(tenant)
    state = store.state(tenant_type)
    found = store.get(tenant_type, state=state)
    if found is None or found.problem:
        return False
    connection: Any = connections[alias]
    path = recording.pinned_path(alias, schema, tenant_type)
    try:
        with guard.raw_transaction(alias) as cursor:
            cursor.execute(_CLAIM.format(table=table()), [state, tenant_type])
            row = cursor.fetchone()
            if row is None:
                return False
            spare = row[0]
            cursor.execute(
                "ALTER SCHEMA %s RENAME TO %s" % (schemas.quote(spare), schemas.quote(schema))
            )
            # Pinned once it has its name: the fingerprint prints the schema's objects
            # unqualified, and through a transaction pooler this stays one server connection.
            guard.pin(connection, cursor, path)
            if recording.fingerprint(cursor, schema) != found.fingerprint:
                raise ReplayMismatch(schema=spare)
    except ReplayMismatch as exc:
        logger.warning(
            "tenantsafe: spare schema %s differs from the recorded migration state; it was "
            "dropped, and %s is provisioned another way",
            exc.schema,
            schema,
        )
        _drop(alias, exc.schema)
        return False
    except DatabaseError as exc:
        # The tenant's schema appeared meanwhile, say: the spare stays for the next signup.
        logger.warning("tenantsafe: claiming a spare schema for %s failed: %s", schema, exc)
        return False
    finally:
        connection.set_schema_to_public()
    logger.info("schema %s: claimed spare schema %s", schema, spare)
    return True
