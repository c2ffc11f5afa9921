"""A Django Channels consumer for the integration tests: plain HTTP, so no WebSocket library is
needed. Channels does not run Django's middleware, so django-tenants' TenantMainMiddleware does
not pick the tenant: the consumer does, from the Host header, as a Channels project does in its
own middleware, and runs its queries through ``database_sync_to_async``."""

from __future__ import annotations

import json
from typing import Any

from channels.db import database_sync_to_async
from channels.generic.http import AsyncHttpConsumer
from django.db import connection
from django_tenants.utils import get_tenant_domain_model

from testproject.shop.models import Product


def _products(host: str) -> dict[str, Any]:
    domain = get_tenant_domain_model().objects.select_related("tenant").get(domain=host)
    connection.set_tenant(domain.tenant)
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT current_schema()")
            (current,) = cursor.fetchone()
        names = [p.name for p in Product.objects.order_by("name").iterator(chunk_size=2)]
        return {"schema": domain.tenant.schema_name, "current_schema": current, "products": names}
    finally:
        connection.set_schema_to_public()


class ProductsConsumer(AsyncHttpConsumer):
    async def handle(self, body: bytes) -> None:
        host = dict(self.scope["headers"])[b"host"].decode().split(":")[0]
        answer = await database_sync_to_async(_products)(host)
        await self.send_response(
            200, json.dumps(answer).encode(), headers=[(b"Content-Type", b"application/json")]
        )
