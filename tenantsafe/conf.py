"""Every TENANTSAFE_* setting, read at call time so override_settings reaches it."""

from __future__ import annotations

from django.conf import settings


def runtime_guard_enabled() -> bool:
    return bool(getattr(settings, "TENANTSAFE_RUNTIME_GUARD", False))


def transaction_pooler(alias: str) -> bool | None:
    """True/False when configured for ``alias``; None means detect it."""
    value = getattr(settings, "TENANTSAFE_TRANSACTION_POOLER", None)
    if isinstance(value, dict):
        value = value.get(alias)
    return None if value is None else bool(value)


def test_tenants() -> list[str] | None:
    value = getattr(settings, "TENANTSAFE_TEST_TENANTS", None)
    return None if value is None else list(value)


def lock_lease_seconds() -> float:
    """How long a tenant's lock outlives its holder's last renewal (a crashed run's lock)."""
    return float(getattr(settings, "TENANTSAFE_LOCK_LEASE_SECONDS", 30))


def lock_timeout() -> str:
    """PostgreSQL's lock_timeout inside each migration transaction ("0" turns it off)."""
    return str(getattr(settings, "TENANTSAFE_LOCK_TIMEOUT", "5s"))


def lock_retries() -> int:
    return int(getattr(settings, "TENANTSAFE_LOCK_RETRIES", 3))


def provisioning() -> str:
    """How tenant.save() provisions a new tenant's schema: "migrate" (django-tenants') or
    "replay"."""
    return str(getattr(settings, "TENANTSAFE_PROVISIONING", None) or "migrate")


def spare_schemas() -> int:
    """How many spare schemas tenantsafe_spares and migrate_schemas_safe keep provisioned."""
    return max(0, int(getattr(settings, "TENANTSAFE_SPARE_SCHEMAS", 0) or 0))


def replay_migrations() -> bool:
    """Whether migrate_schemas_safe applies a plan by replay to tenants like two witnesses."""
    return bool(getattr(settings, "TENANTSAFE_REPLAY_MIGRATIONS", True))


def recording_wait_seconds() -> float:
    """How long provisioning waits for another process's recording of the migration state
    before it migrates (and records) itself."""
    value = getattr(settings, "TENANTSAFE_RECORDING_WAIT_SECONDS", None)
    return 60.0 if value is None else float(value)


def recycle_after_schemas() -> int:
    """After how many distinct schemas a process recycles a connection (tenantsafe.recycling);
    0: never. A value that is not a whole number above 0 counts as 0 (check E010 says so)."""
    value = getattr(settings, "TENANTSAFE_RECYCLE_AFTER_SCHEMAS", None)
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def warm_migrations() -> bool:
    """Whether migrate_schemas_safe shares the migration graph and project states between the
    tenants it migrates through Django (tenantsafe.warm)."""
    return bool(getattr(settings, "TENANTSAFE_WARM_MIGRATIONS", True))


def subprocess_parallel() -> int:
    """django-tenants' TENANT_SUBPROCESS_PARALLEL: the workers ``--executor=subprocess`` gets
    when no --parallel is given."""
    return max(1, int(getattr(settings, "TENANT_SUBPROCESS_PARALLEL", 1) or 1))
