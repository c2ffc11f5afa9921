from __future__ import annotations

from django.apps import AppConfig


class CustomersConfig(AppConfig):
    name = "testproject.customers"
    label = "customers"
    default_auto_field = "django.db.models.BigAutoField"
