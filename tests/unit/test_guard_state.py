"""What the guard reads once per server connection (tenantsafe/guard/state.py read_once: the
pooler and Citus detection): once per driver connection, again after Django reconnects. Pure:
the connection is a stand-in that only holds a driver connection."""

from __future__ import annotations

from typing import Any

from tenantsafe.guard.state import read_once


class Connection:
    """Stands for a Django connection: its driver connection, replaced by a reconnect."""

    def __init__(self) -> None:
        self.connection: Any = object()

    def ensure_connection(self) -> None:
        pass


def test_read_once_per_driver_connection_and_again_after_a_reconnect():
    connection = Connection()
    reads: list[tuple[str, object]] = []

    def reader(what: str) -> Any:
        def read(raw: object) -> int:
            reads.append((what, raw))
            return len(reads)

        return read

    first = connection.connection
    assert read_once(connection, "pooler", reader("pooler")) == 1
    assert read_once(connection, "pooler", reader("pooler")) == 1
    # Another fact is read on its own.
    assert read_once(connection, "citus", reader("citus")) == 2
    # Django opened another driver connection (a reconnect): read again, on it.
    connection.connection = object()
    assert read_once(connection, "pooler", reader("pooler")) == 3
    assert read_once(connection, "pooler", reader("pooler")) == 3
    assert reads == [
        ("pooler", first),
        ("citus", first),
        ("pooler", connection.connection),
    ]
