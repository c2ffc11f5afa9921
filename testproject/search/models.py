from __future__ import annotations

from django.db import models


class SearchEntry(models.Model):
    term = models.CharField(max_length=100)
    hits = models.IntegerField(default=0)

    class Meta:
        indexes = [models.Index(fields=["term"], name="search_term_idx")]
