"""A request of ``bench/bench_catalog_memory.py``: it reads each tenant app's tables, as a
page of an application does, so that the backend caches what such a request makes it cache."""

from __future__ import annotations

from typing import Any

from django.contrib.auth.models import User
from django.db import connection
from django.http import HttpRequest, JsonResponse
from django.urls import path

from testproject.notes.models import Note, Tag
from testproject.shop.models import Product

# django-tenants' connection, which the stubs do not know.
_tenants: Any = connection


def tenant_page(request: HttpRequest) -> JsonResponse:
    products = list(Product.objects.select_related("category").values_list("name", flat=True))
    tags = [(t.label, len(t.notes.all())) for t in Tag.objects.prefetch_related("notes")]
    return JsonResponse(
        {
            "schema": _tenants.schema_name,
            "products": products,
            "notes": Note.objects.filter(pinned=True).count(),
            "tags": tags,
            "users": User.objects.filter(is_active=True).count(),
        }
    )


urlpatterns = [path("page/", tenant_page)]
