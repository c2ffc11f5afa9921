from __future__ import annotations

from django.apps import AppConfig


class TenantsafeConfig(AppConfig):
    name = "tenantsafe"
    verbose_name = "tenantsafe"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from tenantsafe import checks, guard

        guard.install()
        # Checks report misconfiguration; ready() itself never raises for it.
        checks.register()
