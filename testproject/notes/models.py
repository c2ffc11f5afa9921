from __future__ import annotations

from django.db import models


class Note(models.Model):
    title = models.CharField(max_length=100)
    body = models.TextField(default="")
    pinned = models.BooleanField(default=False)


class Tag(models.Model):
    label = models.CharField(max_length=30, unique=True)
    notes = models.ManyToManyField(Note, related_name="tags")
