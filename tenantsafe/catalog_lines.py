"""Catalog lines compared object by object: what of one schema's catalog is otherwise in
another's, named ("index X missing", "column T.C extra", "default of T.C differs").

The lines are those :func:`tenantsafe.recording.catalog_lines` reads (and
:func:`tenantsafe.recording.catalogs` digests), one per object, tab-separated: ``relation``
(name, relkind, persistence), ``column`` (table, name, number, collation, type, not null,
identity, generated, default), ``constraint`` (table, name, type, its catalog columns),
``index`` (table, name, its catalog columns) and ``sequence`` (name, its parameters).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

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
    want = {(o.kind, o.table, o.name): o for o in _renumbered(map(_parse, expected))}
    have = {(o.kind, o.table, o.name): o for o in _renumbered(map(_parse, found))}
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


def _renumbered(objects: Iterable[_Object]) -> list[_Object]:
    """The objects with each table's columns numbered 1, 2, ... in their order, here and in
    constraints and indexes. A dropped column leaves its number unused, which a schema
    restored from a dump (or cloned) does not: the digests differ, the schemas do not."""
    parsed = list(objects)
    numbers: dict[str, dict[str, str]] = {}
    for obj in parsed:
        if obj.kind == "column":
            numbers.setdefault(obj.table, {})[obj.attrs[0]] = ""
    for by_number in numbers.values():
        for place, number in enumerate(sorted(by_number, key=int), start=1):
            by_number[number] = str(place)
    return [_renumber(obj, numbers) for obj in parsed]


def _renumber(obj: _Object, numbers: dict[str, dict[str, str]]) -> _Object:
    own = numbers.get(obj.table, {})
    attrs = list(obj.attrs)
    if obj.kind == "column":
        attrs[0] = own.get(attrs[0], attrs[0])
    elif obj.kind == "constraint" and len(attrs) > 4:
        # contype, deferrable, deferred, validated, conkey, then (a foreign key's) confkey and
        # the table it references, named without the schema when it is this one.
        attrs[4] = _mapped(attrs[4], own)
        if attrs[0] == "f" and len(attrs) > 6:
            attrs[5] = _mapped(attrs[5], numbers.get(attrs[6], {}))
    elif obj.kind == "index":
        # relam, tablespace, options (only when set, "{...}"), four flags, then the key.
        key = 7 if len(attrs) > 2 and attrs[2].startswith("{") else 6
        if len(attrs) > key:
            attrs[key] = _mapped(attrs[key], own, vector=True)
    return obj._replace(attrs=tuple(attrs))


def _mapped(numbers: str, places: dict[str, str], *, vector: bool = False) -> str:
    """Column numbers as PostgreSQL prints an array (``{1,2}``) or an int2vector (``1 2``),
    each replaced by its place; 0 (an expression in an index) is no column."""
    if vector:
        return " ".join(places.get(n, n) for n in numbers.split(" "))
    if not numbers.startswith("{"):
        return numbers
    return "{" + ",".join(places.get(n, n) for n in numbers[1:-1].split(",")) + "}"


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


def digest(lines: Sequence[str]) -> str:
    """The digest :func:`tenantsafe.recording.catalogs` gives a schema with these (sorted) lines."""
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()
