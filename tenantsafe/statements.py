"""What kind of statement a SQL string is, for the guard and for recordings: one list of each."""

from __future__ import annotations

import re

# Statements PostgreSQL refuses inside a transaction block: they cannot be pinned by a
# transaction-local path, nor replayed inside one transaction.
NON_TRANSACTIONAL = re.compile(
    r"^\s*(?:(?:CREATE|DROP)\s+(?:UNIQUE\s+)?INDEX\s+CONCURRENTLY"
    r"|REINDEX\b[^;]*\bCONCURRENTLY|REINDEX\s+(?:\(.*?\)\s*)?(?:SYSTEM|DATABASE|SCHEMA)\b"
    r"|VACUUM\b|CREATE\s+DATABASE|DROP\s+DATABASE|(?:CREATE|DROP)\s+TABLESPACE"
    r"|ALTER\s+SYSTEM|CLUSTER\b|DISCARD\s+ALL)",
    re.IGNORECASE,
)
# Starts, ends or rolls back (to a savepoint) a transaction: a transaction-local setting made
# before it may be gone after it.
TRANSACTION_CONTROL = re.compile(
    r"^\s*(?:BEGIN|START\s+TRANSACTION|COMMIT|ROLLBACK|END|ABORT|PREPARE\s+TRANSACTION)\b",
    re.IGNORECASE,
)
# Starts or ends a transaction anywhere in a (multi-statement) string: a recording replayed
# inside one transaction must not hold one.
ENDS_TRANSACTION = re.compile(
    r"(?:^|;)\s*(?:BEGIN|START\s+TRANSACTION|COMMIT|END|ABORT|ROLLBACK(?!\s+TO\b)"
    r"|PREPARE\s+TRANSACTION)\b",
    re.IGNORECASE,
)
# Session settings: they read no tenant data.
SETTING = re.compile(r"^\s*(?:SET|RESET)\s", re.IGNORECASE)
SET_SEARCH_PATH = re.compile(
    r"^\s*SET\s+(?:SESSION\s+|LOCAL\s+)?search_path\s*(?:=|TO)\s*(.*?)\s*;?\s*$",
    re.IGNORECASE | re.DOTALL,
)
# Reads that cannot change what a schema holds; a SELECT calling one of READ_WITH_EFFECTS
# (or SELECT INTO, which creates a table) changes something.
READ = re.compile(r"^\s*(?:SELECT|SHOW)\b", re.IGNORECASE)
READ_WITH_EFFECTS = re.compile(
    r"\b(?:nextval|setval|set_config|pg_advisory\w*|lo_\w+|INTO)\b", re.IGNORECASE
)
# CONCURRENTLY buys nothing inside a replay's transaction, and is not allowed there.
CONCURRENTLY = re.compile(
    r"^(\s*(?:CREATE\s+(?:UNIQUE\s+)?|DROP\s+)INDEX\s+)CONCURRENTLY\s+", re.IGNORECASE
)

# The row MigrationRecorder.record_applied() writes for each migration migrate applies: as
# Django sends it (the values as parameters) and as a recording holds it (bound).
RECORD_APPLIED = re.compile(
    r'^INSERT INTO "django_migrations" \("app", "name", "applied"\) VALUES \('
)


def short(sql: str, limit: int = 100) -> str:
    """``sql`` on one line, cut at ``limit`` characters: for messages that quote it."""
    return " ".join(sql.split())[:limit]


def is_read(sql: str) -> bool:
    return bool(READ.match(sql)) and not READ_WITH_EFFECTS.search(sql)


# Row locks (SELECT ... FOR UPDATE): held until the transaction ends.
LOCKS_ROWS = re.compile(r"\bFOR\s+(?:NO\s+KEY\s+)?(?:UPDATE|SHARE|KEY\s+SHARE)\b", re.IGNORECASE)


def joins_stream(sql: str) -> bool:
    """Whether ``sql`` may run inside the transaction the guard holds open for a server-side
    cursor: one read that changes nothing and locks nothing, so that running it there rather
    than on its own changes nothing but where it runs. Anything else ends that transaction."""
    return is_read(sql) and ";" not in sql and not LOCKS_ROWS.search(sql)


# Django creates a table, then adds its foreign keys (and unique_together, check constraints)
# with one ALTER TABLE each. The same constraint written into the CREATE TABLE leaves the same
# catalog at less cost: no separate statement, and a foreign key on a new table is not
# checked against its (no) rows.
_CREATE_TABLE = re.compile(r'^CREATE TABLE ("[^"]+") \(.*\)$', re.DOTALL)
_ADD_CONSTRAINT = re.compile(
    r'^ALTER TABLE ("[^"]+") ADD (CONSTRAINT "[^"]+" (?:FOREIGN KEY|UNIQUE|CHECK)\b.*)$', re.DOTALL
)
_REFERENCES = re.compile(r'\bREFERENCES ("[^"]+")')
_NOT_INLINE = re.compile(r"\bNOT\s+VALID\b|\bUSING\s+INDEX\b|;", re.IGNORECASE)
_ALTERS = re.compile(r'^\s*(?:ALTER|DROP)\s+TABLE\s+(?:IF\s+EXISTS\s+)?("[^"]+")', re.IGNORECASE)
# How Django's schema editor writes a change of the schema: one statement, quoted names.
_SCHEMA_CHANGE = re.compile(
    r'^(?:(?:CREATE|ALTER|DROP) (?:TABLE|(?:UNIQUE )?INDEX|SEQUENCE) "|COMMENT ON )'
)
_SELECT = re.compile(r"\bSELECT\b", re.IGNORECASE)


def is_schema_change(sql: str) -> bool:
    """Whether ``sql`` is one statement as Django's schema editor writes them, which reads and
    writes no rows (a part holding more statements, or a query such as CREATE TABLE ... AS
    SELECT, is not)."""
    return bool(_SCHEMA_CHANGE.match(sql)) and ";" not in sql and not _SELECT.search(sql)


def fold_constraints(parts: list[str]) -> list[str]:
    """``parts`` (a recording's statements) with each ``ALTER TABLE t ADD CONSTRAINT`` moved
    into the ``CREATE TABLE t`` before it, where only schema statements come between them and
    none of those alters ``t`` or the table a foreign key references. The caller verifies
    that the result leaves the same schema."""
    creates = [m.group(1) for m in map(_CREATE_TABLE.match, parts) if m]
    created_names = set(creates)
    once = {name for name in created_names if creates.count(name) == 1}
    at: dict[str, int] = {}  # table -> index of its CREATE TABLE in the result
    altered: dict[str, int] = {}  # table -> index of the last statement altering it
    # Index of the last statement that is not a schema change (rows written, a RunSQL): no
    # constraint is moved across one, as an earlier constraint could change what it does (a
    # cascade, a refused row).
    barrier = -1
    result: list[str] = []
    for part in parts:
        if not is_schema_change(part):
            barrier = len(result)
        created = _CREATE_TABLE.match(part)
        if created and created.group(1) in once and _ends_its_list(part, created.end(1) + 2):
            at[created.group(1)] = len(result)
            result.append(part)
            continue
        added = _ADD_CONSTRAINT.match(part)
        if added and _foldable(added, at, created_names, altered, barrier):
            table = added.group(1)
            result[at[table]] = f"{result[at[table]][:-1]}, {added.group(2)})"
            continue
        alters = _ALTERS.match(part)
        if alters:
            altered[alters.group(1)] = len(result)
        result.append(part)
    return result


def _ends_its_list(sql: str, start: int) -> bool:
    """Whether the parenthesis opened just before ``start`` closes at the end of ``sql`` (and
    not, say, before a ``PARTITION BY (...)``), outside quotes."""
    depth, quote = 1, ""
    for i in range(start, len(sql)):
        char = sql[i]
        if quote:
            if char == quote:
                quote = ""
        elif char in "'\"":
            quote = char
        elif char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
            if depth == 0:
                return i == len(sql) - 1
    return False


def _foldable(
    added: re.Match[str],
    at: dict[str, int],
    created: set[str],
    altered: dict[str, int],
    barrier: int,
) -> bool:
    table, constraint = added.groups()
    if table not in at or max(barrier, altered.get(table, -1)) > at[table]:
        return False
    if _NOT_INLINE.search(constraint):
        return False
    referenced = _REFERENCES.search(constraint)
    if referenced is None or referenced.group(1) == table:
        return True
    # The referenced table must be as it will be when this one is created: created before
    # it (or not by the recording), and not altered since.
    target = referenced.group(1)
    if target in created and not (target in at and at[target] < at[table]):
        return False
    return altered.get(target, -1) < at[table]
