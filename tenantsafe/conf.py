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
