"""Provisioning tenant schemas from a recording of the statements their migration ran.

Internal: this package may change without notice; use :mod:`tenantsafe.provisioning` and
:mod:`tenantsafe.testing`.

Migrating a schema mostly costs Python: loading the graph, rendering model states, running
post_migrate handlers. The SQL it sends is small and, for a fresh schema, the same every time.
So the first schema for a given migration state is migrated while an execute wrapper records
every statement that changed something; later schemas replay that recording in one
transaction with the search_path pinned, which leaves the same tables, rows and sequence
values.

A recording is only trusted when nothing in it is specific to the schema it was taken from
(its name, its tenant's domain or field values, a read of its tenant's row) and when it can
run inside one transaction; otherwise the row says why, and every schema is migrated. A replay
commits only if the new schema's catalog fingerprint equals the recorded one.

The modules, each one concern, lower ones first:

- :mod:`~tenantsafe.recording.state`: :func:`state_key`, the digest of everything a fresh
  schema's migration depends on (kept per process in :mod:`tenantsafe.registry`), and
  :class:`Recording`, what is recorded for a state.
- :mod:`~tenantsafe.recording.files`: the files xdist workers of one test session share.
- :mod:`~tenantsafe.recording.store`: :class:`RecordingStore`, the one class owning
  ``public.tenantsafe_recording`` (as Django's MigrationRecorder owns ``django_migrations``):
  ``get``, ``keep``, ``discard``, and ``turn_to_record`` so that processes sharing the
  database record a state once. ``RecordingStore(alias, share_files=True)`` (what
  ``create_tenant`` uses) shares recordings through files too.
- :mod:`~tenantsafe.recording.fingerprints`: catalog and row digests (also what a deploy
  groups tenants by, and what a claimed spare is checked by).
- :mod:`~tenantsafe.recording.replaying`: :func:`replay` into a new schema, and the search
  path a replay pins (:func:`pinned_path`).
- :mod:`~tenantsafe.recording.recorder`: the :class:`Recorder` execute wrapper, what of its
  statements can be replayed (:func:`taken`), and :func:`record` around a fresh schema's
  migration.

Callers construct a store and pass it along: :func:`record` around a fresh schema's
migration, :func:`replay` for the next schemas, ``store.get`` to look, ``store.turn_to_record``
to record a state once.
"""

from __future__ import annotations

from tenantsafe.recording.fingerprints import (
    ROW_LIMIT,
    WITHOUT_IDS,
    catalog_lines,
    catalogs,
    fingerprint,
    rows_digests,
)
from tenantsafe.recording.recorder import SEPARATOR, Recorder, identifying, record, taken
from tenantsafe.recording.replaying import in_scratch, pinned_path, replay
from tenantsafe.recording.state import Recording, state_key
from tenantsafe.recording.store import TABLE, RecordingStore

__all__ = [
    "ROW_LIMIT",
    "SEPARATOR",
    "TABLE",
    "WITHOUT_IDS",
    "Recorder",
    "Recording",
    "RecordingStore",
    "catalog_lines",
    "catalogs",
    "fingerprint",
    "identifying",
    "in_scratch",
    "pinned_path",
    "record",
    "replay",
    "rows_digests",
    "state_key",
    "taken",
]
