from __future__ import annotations

from django.apps import AppConfig


class NotesConfig(AppConfig):
    name = "testproject.notes"
    label = "notes"
    default_auto_field = "django.db.models.BigAutoField"
