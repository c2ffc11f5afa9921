"""Where recordings live: ``public.tenantsafe_recording``, owned by :class:`RecordingStore`.

As Django's MigrationRecorder owns ``django_migrations``: one class that creates its table on
first use (``ensure_schema``), looks a recording up (``get``), keeps one (``keep``), gives up
on a state (``discard``), and lets processes sharing the database record a state once
(``turn_to_record``). One row per migration state and tenant type, so every process sharing
the database replays what the first one recorded. A row is looked up by the current state's
digest: after a deploy that changes a migration, the old row is never used, and the next
recording deletes it.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from types import TracebackType
from typing import Any

from django.db import connections, transaction

from tenantsafe import conf, locks, own_tables
from tenantsafe.recording.files import SharedFiles
from tenantsafe.recording.state import Recording, state_key

logger = logging.getLogger("tenantsafe.recording")

TABLE = "tenantsafe_recording"


class RecordingStore:
    """The recordings of database ``alias``; with ``share_files``, also those of the other
    xdist workers of a test session (see :mod:`tenantsafe.recording.files`). Close it (or use
    it as a context manager) to release the file locks it took."""

    def __init__(self, alias: str, *, share_files: bool = False) -> None:
        self.alias = alias
        self.files = SharedFiles() if share_files else None

    def __enter__(self) -> RecordingStore:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        if self.files is not None:
            self.files.release()

    @staticmethod
    def table() -> str:
        return own_tables.qualified(TABLE)

    def ensure_schema(self) -> None:
        own_tables.ensure(
            self.alias,
            TABLE,
            "state text NOT NULL, tenant_type text NOT NULL, statements text NOT NULL, "
            "fingerprint text NOT NULL, problem text NOT NULL, "
            "created_at timestamptz NOT NULL DEFAULT now(), PRIMARY KEY (state, tenant_type)",
        )

    def state(self, tenant_type: str = "") -> str:
        return state_key(self.alias, tenant_type)

    def get(self, tenant_type: str = "", *, state: str | None = None) -> Recording | None:
        """The recording for the current migration state (usable or saying why not), if any."""
        state = state or self.state(tenant_type)
        self.ensure_schema()
        connection: Any = connections[self.alias]
        connection.set_schema_to_public()
        with connection.cursor() as cursor:
            cursor.execute(
                f"SELECT statements, fingerprint, problem FROM {self.table()} "  # noqa: S608
                "WHERE state = %s AND tenant_type = %s",
                [state, tenant_type],
            )
            row = cursor.fetchone()
        if row is not None:
            return Recording(state, tenant_type, row[0], row[1], row[2])
        shared = self.files.read(state, tenant_type) if self.files is not None else None
        if shared is not None:
            self.keep(shared)
        return shared

    def keep(self, recording: Recording) -> None:
        """Keep ``recording`` unless one for its state is there already (a refusal replaces
        it); drop older states' recordings."""
        self.ensure_schema()
        connection: Any = connections[self.alias]
        connection.set_schema_to_public()
        with transaction.atomic(using=self.alias), connection.cursor() as cursor:
            own_tables.lock(cursor, own_tables.RECORDING_LOCK, recording.tenant_type)
            cursor.execute(
                f"DELETE FROM {self.table()} WHERE tenant_type = %s AND state <> %s",  # noqa: S608
                [recording.tenant_type, recording.state],
            )
            cursor.execute(
                f"INSERT INTO {self.table()} AS r (state, tenant_type, statements, "  # noqa: S608
                "fingerprint, problem) VALUES (%s, %s, %s, %s, %s) "
                "ON CONFLICT (state, tenant_type) "
                "DO UPDATE SET statements = '', fingerprint = '', problem = excluded.problem "
                "WHERE excluded.problem <> '' AND r.problem = ''",
                [
                    recording.state,
                    recording.tenant_type,
                    recording.sql,
                    recording.fingerprint,
                    recording.problem,
                ],
            )

    def discard(self, state: str, tenant_type: str, problem: str) -> None:
        """Stop replaying for ``state``: its schemas are migrated one by one from now on."""
        logger.warning("tenantsafe: new tenant schemas will be migrated, not replayed: %s", problem)
        if self.files is not None:
            self.files.remove(state, tenant_type)
        self.keep(Recording(state, tenant_type, "", "", problem))

    def finish(self, recording: Recording) -> None:
        """Keep what a recording run made (or why it cannot be replayed), and let the
        processes waiting for it go on."""
        if recording.problem:
            self.discard(recording.state, recording.tenant_type, recording.problem)
        else:
            self.keep(recording)
        if self.files is not None:
            self.files.write(recording)

    # Recording once. Processes sharing a database that find no recording for their state (two
    # web workers' first signups after a deploy, say) make it once between them: the first
    # takes a claim, a lease (tenantsafe.locks) on a name no schema can have, and records; the
    # others poll until its recording is stored. A lease needs no session or open transaction,
    # so this holds through a transaction pooler, and a dead recorder's claim expires (at once
    # when its process on this host is gone). A waiter that waited
    # TENANTSAFE_RECORDING_WAIT_SECONDS, or whose recorder gave up, records itself, as every
    # process did before.

    @contextlib.contextmanager
    def turn_to_record(self, tenant_type: str = "") -> Iterator[Recording | None]:
        """The current migration state's recording, after waiting while another process
        records it; None when this process is to record it, and then the block holds the
        claim that makes the others wait (unless it waited in vain). Call it outside any
        transaction."""
        state = self.state(tenant_type)
        found = self.get(tenant_type, state=state)
        if found is not None:
            yield found
            return
        claim, found = self._claim(state, tenant_type)
        try:
            yield found
        finally:
            if claim is not None:
                claim.complete()
                claim.release()

    def _claim(self, state: str, tenant_type: str) -> tuple[locks.Lease | None, Recording | None]:
        name = f"recording:{tenant_type}:{state}"
        wait = conf.recording_wait_seconds()
        deadline = time.monotonic() + wait
        pauses = locks.pauses()
        while True:
            claim = locks.try_lease(self.alias, name, purpose="record")
            # Looked at after the claim: its previous holder may have stored it and gone.
            found = self.get(tenant_type, state=state)
            if claim is not None and found is None:
                return claim, None
            if claim is not None:
                claim.complete()
                claim.release()
            if found is not None:
                return None, found
            if time.monotonic() >= deadline:
                logger.warning(
                    "tenantsafe: waited %.0f s for another process to record the migration "
                    "state; migrating and recording here instead",
                    wait,
                )
                return None, None
            time.sleep(next(pauses))
