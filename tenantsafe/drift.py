"""Catalog drift: tenants whose schema is not what their migration state says.

Every tenant's catalog is digested (:func:`tenantsafe.recording.catalogs`, one query per
``CHUNK`` schemas) and compared with the catalog expected for its migration state: for
tenants that have every migration, the one a new tenant gets, which the provisioning
recording leaves (replayed into a scratch schema and rolled back, and only when that leaves
the recording's own fingerprint); for any other state, or without a recording, the catalog
most tenants at that state (same tenant type, same applied migrations) have. Only then are
the catalogs' lines read (:func:`tenantsafe.recording.catalog_lines`), for one tenant per
distinct digest, and the differences named (:mod:`tenantsafe.catalog_lines`): so the doctor
reads all tenants in a few queries however many drifted.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from django.db import DatabaseError, connections

from tenantsafe import guard, own_tables, plan, recording, schemas
from tenantsafe.catalog_lines import Difference, describe, differences, digest
from tenantsafe.findings import quoted

logger = logging.getLogger("tenantsafe.drift")

# Schemas per digest query, and per query of lines.
CHUNK = 1000
LINES_CHUNK = 100


@dataclass(frozen=True)
class Drift:
    """A tenant whose catalog is not the one expected for its migration state."""

    schema: str
    # What it was compared with: RECORDING (what a new tenant gets) or MOST (what most
    # tenants at its migration state have).
    reference: str
    # How many tenants at its migration state have the expected catalog, of how many.
    alike: int
    of: int
    differences: tuple[Difference, ...]

    def describe(self) -> str:
        return describe(self.differences)


RECORDING = "recording"
MOST = "most"


class _Group(NamedTuple):
    """The tenants of one tenant type and applied set, by catalog digest."""

    tenant_type: str
    current: bool
    by_digest: dict[str, list[str]]

    @property
    def most(self) -> str:
        # The catalog most tenants have; between as many, the one listed first.
        return max(self.by_digest, key=lambda d: len(self.by_digest[d]))


class _Expected(NamedTuple):
    reference: str
    digest: str
    # The expected lines; None to read from the first tenant with ``digest``.
    lines: list[str] | None


def find(
    alias: str, entries: Sequence[plan.SchemaPlan], digests: dict[str, str] | None = None
) -> list[Drift]:
    """The tenants of ``entries`` whose catalog is not the expected one, in their order;
    ``digests``: their catalog digests, if read already (:func:`catalogs_of`). Call it with
    public's search path (under the guard behind a pooler)."""
    groups = _groups(alias, entries, digests)
    recorded: dict[str, list[str] | None] = {}
    expected: list[_Expected] = []
    for group in groups:
        if group.current and group.tenant_type not in recorded:
            recorded[group.tenant_type] = recorded_catalog(alias, group.tenant_type)
        lines = recorded.get(group.tenant_type) if group.current else None
        if lines is not None:
            expected.append(_Expected(RECORDING, digest(lines), lines))
        else:
            expected.append(_Expected(MOST, group.most, None))
    found = _compared(alias, groups, expected)
    # Alike but for how their columns are numbered (see catalog_lines): no drift.
    return [found[e.schema] for e in entries if e.schema in found and found[e.schema].differences]


def apart(alias: str, catalogs: dict[str, str]) -> list[Drift]:
    """Tenants at one migration state with their catalog digests (``catalogs``, in order):
    those whose catalog is not the one most of them have, and how it differs (one query)."""
    group = _Group("", False, {})
    for name, found in catalogs.items():
        group.by_digest.setdefault(found, []).append(name)
    if len(group.by_digest) < 2:
        return []
    found_ = _compared(alias, [group], [_Expected(MOST, group.most, None)])
    return [found_[name] for name in catalogs if name in found_]


def _compared(alias: str, groups: list[_Group], expected: list[_Expected]) -> dict[str, Drift]:
    """Each tenant of ``groups`` whose catalog is not its group's ``expected`` one."""
    # The lines of one tenant per catalog that is not the expected one, and of the expected
    # one where it is a tenant's: one query per LINES_CHUNK of them.
    wanted: list[str] = []
    for group, want in zip(groups, expected, strict=True):
        others = [names[0] for d, names in group.by_digest.items() if d != want.digest]
        if others and want.lines is None:
            others.append(group.by_digest[want.digest][0])
        wanted += others
    lines_of = _lines(alias, wanted)
    found: dict[str, Drift] = {}
    for group, want in zip(groups, expected, strict=True):
        reference = want.lines
        if reference is None:
            reference = lines_of.get(group.by_digest[want.digest][0], [])
        total = sum(len(names) for names in group.by_digest.values())
        alike = len(group.by_digest.get(want.digest, []))
        for d, names in group.by_digest.items():
            if d != want.digest:
                diff = differences(reference, lines_of.get(names[0], []))
                found.update((n, Drift(n, want.reference, alike, total, diff)) for n in names)
    return found


def grouped_apart(drifts: Sequence[Drift]) -> list[str]:
    """What a deploy says of the tenants :func:`apart` found: one sentence per catalog. Those
    alike but for how their columns are numbered are grouped apart too (their digests differ),
    and said so."""
    by_catalog: dict[tuple[Difference, ...], list[Drift]] = {}
    for one in drifts:
        by_catalog.setdefault(one.differences, []).append(one)
    said = []
    for diff, like in by_catalog.items():
        names = ", ".join(quoted(d.schema) for d in like[:_NAMED])
        more = f" and {len(like) - _NAMED} more" if len(like) > _NAMED else ""
        verb, pronoun = ("differs", "it is") if len(like) == 1 else ("differ", "they are")
        said.append(
            f"{names}{more} {verb} from the {like[0].alike} alike tenant(s) at the same "
            f"migration state, so {pronoun} grouped apart: {describe(diff) or _RENUMBERED}."
        )
    return said


_RENUMBERED = (
    "only the numbers of the columns of some table differ (where columns were dropped, a "
    "schema restored from a dump or cloned numbers them anew)"
)
# Tenants named in a deploy's sentence about a catalog; the others are counted.
_NAMED = 5


def _groups(
    alias: str, entries: Sequence[plan.SchemaPlan], digests: dict[str, str] | None
) -> list[_Group]:
    """The tenants to compare, by tenant type and applied migrations, then by digest."""
    keyed = [
        e
        for e in entries
        if e.applied is not None and e.plan is not None and schemas.is_valid(e.schema)
    ]
    if digests is None:
        digests = catalogs_of(alias, [e.schema for e in keyed])
    groups: dict[tuple[str, Any], _Group] = {}
    for entry in keyed:
        if entry.schema not in digests:
            continue
        assert entry.plan is not None
        key = (entry.tenant_type, entry.applied)
        group = groups.setdefault(key, _Group(entry.tenant_type, entry.plan.empty, {}))
        group.by_digest.setdefault(digests[entry.schema], []).append(entry.schema)
    return list(groups.values())


def catalogs_of(alias: str, names: Sequence[str]) -> dict[str, str]:
    """The catalog digest of each schema of ``names``, CHUNK schemas a query."""
    digests: dict[str, str] = {}
    connection: Any = connections[alias]
    connection.set_schema_to_public()
    for start in range(0, len(names), CHUNK):
        with connection.cursor() as cursor:
            digests.update(recording.catalogs(cursor, names[start : start + CHUNK]))
    return digests


def _lines(alias: str, names: Sequence[str]) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    connection: Any = connections[alias]
    for start in range(0, len(names), LINES_CHUNK):
        with connection.cursor() as cursor:
            found.update(recording.catalog_lines(cursor, names[start : start + LINES_CHUNK]))
    return found


def recorded_catalog(alias: str, tenant_type: str = "") -> list[str] | None:
    """The catalog lines a new tenant of ``tenant_type`` gets from the provisioning recording
    of the current migration state; None without a usable recording (or when replaying it
    does not leave its fingerprint). Replayed into a scratch schema and rolled back."""
    if not own_tables.exists(alias, recording.TABLE):
        return None
    recorded = recording.RecordingStore(alias).get(tenant_type)
    if recorded is None or recorded.problem:
        return None
    connection: Any = connections[alias]
    try:
        with recording.in_scratch(alias, tenant_type, recorded.sql) as (cursor, scratch):
            if recording.fingerprint(cursor, scratch) != recorded.fingerprint:
                return None
            # Read as the tenants' catalogs are, with public's path: objects of other
            # schemas print as they do there.
            connection.set_schema_to_public()
            guard.pin(connection, cursor, guard.search_path(connection))
            return recording.catalog_lines(cursor, [scratch]).get(scratch, [])
    except DatabaseError:
        logger.warning("cannot replay the recording to compare tenants with it", exc_info=True)
        return None
