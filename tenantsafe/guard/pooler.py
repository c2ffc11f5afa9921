"""Whether a transaction pooler stands between a connection and PostgreSQL."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tenantsafe import conf
from tenantsafe.guard import state


@dataclass(frozen=True)
class Pooler:
    pooled: bool
    # "TENANTSAFE_TRANSACTION_POOLER" or "detected".
    source: str
    configured_port: int
    # What PostgreSQL reports (inet_server_port()); None through a Unix socket.
    server_port: int | None

    def describe(self, alias: str) -> str:
        if self.source != "detected":
            why = f"as TENANTSAFE_TRANSACTION_POOLER says ({self.pooled})"
        elif self.server_port is None:
            why = "detected: connected through a Unix socket"
        else:
            relation = "differs from" if self.pooled else "matches"
            why = (
                f"detected: server port {self.server_port} {relation} the configured port "
                f"{self.configured_port}"
            )
        state = "through a transaction pooler" if self.pooled else "directly to PostgreSQL"
        return f"connects {state} ({why})"


def detect(connection: Any) -> Pooler:
    """``TENANTSAFE_TRANSACTION_POOLER`` decides when set; otherwise a proxy shows itself by
    the server port PostgreSQL reports differing from the port Django connected to.

    Read once per server connection (Django's, not the pooler's: a reconnect reads again).
    """
    port = int(connection.settings_dict.get("PORT") or 5432)
    configured = conf.transaction_pooler(connection.alias)
    if configured is not None:
        return Pooler(configured, "TENANTSAFE_TRANSACTION_POOLER", port, None)
    host = connection.settings_dict.get("HOST") or ""

    def read(raw: Any) -> Pooler:
        with raw.cursor() as cursor:
            cursor.execute("SELECT inet_server_port()")
            server_port = cursor.fetchone()[0]
        if server_port is None:
            pooled = bool(host) and not host.startswith("/")
        else:
            pooled = int(server_port) != port
        return Pooler(pooled, "detected", port, None if server_port is None else int(server_port))

    return state.read_once(connection, "pooler", read)


def is_pooled(connection: Any) -> bool:
    """Whether a transaction pooler may stand between this connection and PostgreSQL."""
    return detect(connection).pooled
