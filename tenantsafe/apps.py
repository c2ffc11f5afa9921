from __future__ import annotations

from django.apps import AppConfig


class TenantsafeConfig(AppConfig):
    name = "tenantsafe"
    verbose_name = "tenantsafe"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from django.db.models.signals import pre_save

        from tenantsafe import autoschema, checks, guard, provisioning, recycling

        guard.install()
        recycling.install()
        # Checks report misconfiguration; ready() itself never raises for it.
        checks.register()
        # The _skip_auto_migrate contract of create_tenant: any tenant model, no changes to it.
        pre_save.connect(
            autoschema.honour_skip_auto_migrate, dispatch_uid="tenantsafe.skip_auto_migrate"
        )
        # After it, so that a tenant whose schema is left alone is not provisioned either.
        pre_save.connect(provisioning.arm_on_save, dispatch_uid="tenantsafe.provisioning")
