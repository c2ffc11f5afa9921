from __future__ import annotations

from django.db import connection
from django.http import HttpRequest, JsonResponse

from testproject.shop.models import Product


def product_names(request: HttpRequest) -> JsonResponse:
    names = sorted(Product.objects.values_list("name", flat=True))
    return JsonResponse({"schema": connection.schema_name, "products": names})
