"""Catalog drift: tenants whose schema is not what their migration state says.

Every tenant's catalog is digested (:func:`tenantsafe.replay.catalogs`, one query per
``CHUNK`` schemas) and compared with the catalog expected for its migration state: for
tenants that have every migration, the one a new tenant gets, which the provisioning
recording leaves (replayed into a scratch schema and rolled back, and only when that leaves
the recording's own fingerprint); for any other state, or without a recording, the catalog
most tenants at that state (same tenant type, same applied migrations) have. Only then are
the catalogs' lines read (:func:`tenantsafe.replay.catalog_lines`), for one tenant per
distinct digest, and the differences named: so the doctor reads all tenants in a few
queries however many drifted.

The lines come from the fingerprint's query, one per object, tab-separated: ``relation``
(name, relkind, persistence), ``column`` (table, name, number, collation, type, not null,
identity, generated, default), ``constraint`` (table, name, type, definition), ``index``
(table, name, its catalog columns) and ``sequence`` (name, its parameters).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from django.db import DatabaseError, connections

from tenantsafe import guard, own_tables, plan, replay, schemas
from tenantsafe.findings import quoted

logger = logging.getLogger("tenantsafe.drift")

# Schemas per digest query, and per query of lines.
CHUNK = 1000
LINES_CHUNK = 100

MISSING = "missing"
EXTRA = "extra"
DIFFERS = "differs"
RENAMED = "renamed"

_RELKINDS = {
    "r": "table",
    "p": "table",
    "v": "view",
    "m": "materialized view",
    "S": "sequence",
    "f": "foreign table",
    "c": "type",
}
# What each attribute of a line is, by kind of object (others differ in their "definition").
_FIELDS = {
    "column": ("position", "collation", "type", "nullability", "identity", "generation", "default"),
    "relation": ("kind", "persistence"),
}
_VALUES = {
    "nullability": {"t": "NOT NULL", "f": "NULL"},
    "kind": _RELKINDS,
    "persistence": {"p": "permanent", "u": "unlogged", "t": "temporary"},
}
# Shown with their values in the text: short, and what a reader wants to see at once.
_SHOWN = {"type", "nullability", "kind", "persistence"}
# Objects in the order a difference list names them, table by table.
_ORDER = ("relation", "column", "constraint", "index", "sequence")


class _Object(NamedTuple):
    kind: str
    table: str
    name: str
    attrs: tuple[str, ...]


@dataclass(frozen=True)
class Difference:
    """One object that is not as expected: ``what`` (table, column, constraint, index,
    sequence, ...) ``name`` is ``change`` (missing, extra, differs in ``attribute``,
    renamed to ``found``)."""

    what: str
    name: str
    change: str
    attribute: str = ""
    expected: str | None = None
    found: str | None = None

    def describe(self) -> str:
        if self.change == RENAMED:
            return f"{self.what} {self.name} renamed to {self.found}"
        if self.change != DIFFERS:
            return f"{self.what} {self.name} {self.change}"
        # A column's name says it is one (table.column).
        what = "" if self.what == "column" else f"{self.what} "
        text = f"{self.attribute} of {what}{self.name} differs"
        if self.attribute in _SHOWN:
            text += f" ({self.found}, expected {self.expected})"
        return text


def describe(differences: Iterable[Difference]) -> str:
    return "; ".join(d.describe() for d in differences)


def _parse(line: str) -> _Object:
    kind, table, *rest = line.split("\t")
    if kind in ("relation", "sequence"):
        return _Object(kind, table, table, tuple(rest))
    return _Object(kind, table, rest[0], tuple(rest[1:]))


def _compare(want: _Object, have: _Object) -> list[Difference]:
    fields = _FIELDS.get(want.kind)
    if fields is None:
        definitions = "\t".join(want.attrs), "\t".join(have.attrs)
        return [Difference(_what(want), _display(want), DIFFERS, "definition", *definitions)]
    return [
        Difference(_what(want), _display(want), DIFFERS, field, _value(field, a), _value(field, b))
        for field, a, b in zip(fields, want.attrs, have.attrs, strict=False)
        if a != b
    ]


def _value(field: str, value: str) -> str:
    return _VALUES.get(field, {}).get(value, value)


def _what(obj: _Object) -> str:
    if obj.kind == "relation":
        return _RELKINDS.get(obj.attrs[0] if obj.attrs else "", "relation")
    return obj.kind


def _display(obj: _Object) -> str:
    return f"{obj.table}.{obj.name}" if obj.kind == "column" else obj.name


def _same_but_name(one: _Object, other: _Object) -> bool:
    if one.kind != other.kind or one.table != other.table or one.kind not in _RENAMEABLE:
        return False
    # An index's deparsed expression or predicate names the index itself.
    return one.attrs == tuple(a.replace(other.name, one.name) for a in other.attrs)


_RENAMEABLE = ("column", "constraint", "index")


def differences(expected: Iterable[str], found: Iterable[str]) -> tuple[Difference, ...]:
    """What of the catalog lines ``expected`` is otherwise in ``found``, object by object."""
    want = {(o.kind, o.table, o.name): o for o in map(_parse, expected)}
    have = {(o.kind, o.table, o.name): o for o in map(_parse, found)}
    missing = [want[k] for k in want.keys() - have.keys()]
    extra = [have[k] for k in have.keys() - want.keys()]
    # Objects of a missing or extra relation are not named one by one.
    gone = {o.name for o in missing if o.kind == "relation"}
    new = {o.name for o in extra if o.kind == "relation"}
    missing = [o for o in missing if o.kind == "relation" or o.table not in gone]
    extra = [o for o in extra if o.kind == "relation" or o.table not in new]
    found_list: list[tuple[_Object, Difference]] = []
    for obj in sorted(missing):
        twin = next((o for o in sorted(extra) if _same_but_name(obj, o)), None)
        if twin is not None:
            extra.remove(twin)
            change = Difference(obj.kind, _display(obj), RENAMED, found=_display(twin))
            found_list.append((obj, change))
        else:
            found_list.append((obj, Difference(_what(obj), _display(obj), MISSING)))
    found_list += [(obj, Difference(_what(obj), _display(obj), EXTRA)) for obj in extra]
    for key in want.keys() & have.keys():
        if want[key] != have[key]:
            found_list += [(want[key], d) for d in _compare(want[key], have[key])]
    return tuple(d for _, d in sorted(_without_constraint_indexes(found_list), key=_position))


def _without_constraint_indexes(
    found: list[tuple[_Object, Difference]],
) -> list[tuple[_Object, Difference]]:
    # A primary key or unique constraint has an index of the same name, which changes with it
    # (renamed with it, gone with it): named once, as the constraint. A sequence's relation
    # line and its parameters line likewise.
    constraints = {(obj.table, obj.name, d.change) for obj, d in found if obj.kind == "constraint"}
    relations = {(obj.name, d.change) for obj, d in found if obj.kind == "relation"}
    return [
        (obj, d)
        for obj, d in found
        if not (obj.kind == "index" and (obj.table, obj.name, d.change) in constraints)
        and not (obj.kind == "sequence" and (obj.name, d.change) in relations)
    ]


def _position(item: tuple[_Object, Difference]) -> tuple[str, int, str, str]:
    obj, difference = item
    return (obj.table, _ORDER.index(obj.kind), obj.name, difference.attribute)


# Reading the database.


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


def find(alias: str, entries: Sequence[plan.SchemaPlan]) -> list[Drift]:
    """The tenants of ``entries`` whose catalog is not the expected one, in their order.
    Call it with public's search path (under the guard behind a pooler)."""
    groups = _groups(alias, entries)
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
    return [found[e.schema] for e in entries if e.schema in found]


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
    """What a deploy says of the tenants :func:`apart` found: one sentence per catalog."""
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
            f"migration state, so {pronoun} grouped apart: {describe(diff)}."
        )
    return said


# Tenants named in a deploy's sentence about a catalog; the others are counted.
_NAMED = 5


def digest(lines: Sequence[str]) -> str:
    """The digest :func:`tenantsafe.replay.catalogs` gives a schema with these (sorted) lines."""
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def _groups(alias: str, entries: Sequence[plan.SchemaPlan]) -> list[_Group]:
    """The tenants to compare, by tenant type and applied migrations, then by digest."""
    keyed = [
        e
        for e in entries
        if e.applied is not None and e.plan is not None and schemas.is_valid(e.schema)
    ]
    digests: dict[str, str] = {}
    connection: Any = connections[alias]
    for start in range(0, len(keyed), CHUNK):
        with connection.cursor() as cursor:
            digests.update(
                replay.catalogs(cursor, [e.schema for e in keyed[start : start + CHUNK]])
            )
    groups: dict[tuple[str, Any], _Group] = {}
    for entry in keyed:
        if entry.schema not in digests:
            continue
        assert entry.plan is not None
        key = (entry.tenant_type, entry.applied)
        group = groups.setdefault(key, _Group(entry.tenant_type, entry.plan.empty, {}))
        group.by_digest.setdefault(digests[entry.schema], []).append(entry.schema)
    return list(groups.values())


def _lines(alias: str, names: Sequence[str]) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    connection: Any = connections[alias]
    for start in range(0, len(names), LINES_CHUNK):
        with connection.cursor() as cursor:
            found.update(replay.catalog_lines(cursor, names[start : start + LINES_CHUNK]))
    return found


def recorded_catalog(alias: str, tenant_type: str = "") -> list[str] | None:
    """The catalog lines a new tenant of ``tenant_type`` gets from the provisioning recording
    of the current migration state; None without a usable recording (or when replaying it
    does not leave its fingerprint). Replayed into a scratch schema and rolled back."""
    if not own_tables.exists(alias, replay.TABLE):
        return None
    recording = replay.recording_for(alias, tenant_type)
    if recording is None or recording.problem:
        return None
    connection: Any = connections[alias]
    try:
        with replay.in_scratch(alias, tenant_type, recording.sql) as (cursor, scratch):
            if replay.fingerprint(cursor, scratch) != recording.fingerprint:
                return None
            # Read as the tenants' catalogs are, with public's path: objects of other
            # schemas print as they do there.
            connection.set_schema_to_public()
            guard.pin(connection, cursor, guard.search_path(connection))
            return replay.catalog_lines(cursor, [scratch]).get(scratch, [])
    except DatabaseError:
        logger.warning("cannot replay the recording to compare tenants with it", exc_info=True)
        return None
