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


def is_read(sql: str) -> bool:
    return bool(READ.match(sql)) and not READ_WITH_EFFECTS.search(sql)
