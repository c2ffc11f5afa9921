from __future__ import annotations

from django.apps import AppConfig
from django.db.models.signals import post_migrate, pre_migrate


class CustomersConfig(AppConfig):
    name = "testproject.customers"
    label = "customers"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from testproject import faults

        # Connected before contenttypes' and auth's receivers (customers comes first in
        # INSTALLED_APPS), so a hold here is before any content type or permission exists.
        post_migrate.connect(faults.on_post_migrate, dispatch_uid="testproject.faults.hold")
        pre_migrate.connect(faults.on_pre_migrate, dispatch_uid="testproject.faults.hold_pre")
