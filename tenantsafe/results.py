"""What a run did, tenant by tenant: statuses and small frozen results (a leaf module)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

MIGRATED = "migrated"
# Migrated by replay of what tenants like it recorded (tenantsafe.migrate.deploy).
REPLAYED = "replayed"
CURRENT = "current"
PENDING = "pending"
PLANNED = "planned"
FAILED = "failed"
# The run stopped (a signal, --max-failures, an unreachable database) before this tenant.
NOT_ATTEMPTED = "not attempted"
# How provision() made a new tenant's schema: a claimed spare schema (or, as above, by replay
# or migrated).
SPARE = "spare"


class TenantRef(NamedTuple):
    """A tenant as a run sees it: its schema and (with multi-type tenants) its type."""

    schema: str
    tenant_type: str = ""


@dataclass(frozen=True)
class TenantResult:
    schema: str
    status: str
    error: str = ""
    traceback: str = ""


@dataclass(frozen=True)
class Summary:
    results: tuple[TenantResult, ...] = ()
    public_problems: tuple[str, ...] = ()
    elapsed: float = 0.0
    # Why no more tenants were started, when the run stopped early; empty otherwise.
    stopped: str = ""
    # The exit status the stop asks for (130 after SIGINT, 143 after SIGTERM); 0 otherwise.
    stop_status: int = 0

    def count(self, status: str) -> int:
        return sum(1 for r in self.results if r.status == status)

    @property
    def failed(self) -> list[TenantResult]:
        return [r for r in self.results if r.status == FAILED]
