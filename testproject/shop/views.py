from __future__ import annotations

from asgiref.sync import sync_to_async
from django.db import connection
from django.http import HttpRequest, JsonResponse

from testproject.notes.models import Note
from testproject.shop.models import Product


def product_names(request: HttpRequest) -> JsonResponse:
    names = sorted(Product.objects.values_list("name", flat=True))
    return JsonResponse({"schema": connection.schema_name, "products": names})


def add_note(request: HttpRequest) -> JsonResponse:
    """Sync: a note titled ``?title=``, and the tenant's products (one read per product)."""
    note = Note.objects.create(title=request.GET["title"])
    return JsonResponse(
        {
            "schema": request.tenant.schema_name,  # type: ignore[attr-defined]
            "note": note.pk,
            "products": [p.name for p in Product.objects.order_by("name")],
        }
    )


# Async views on the async ORM. ``connection`` belongs to the thread the ORM runs in (the
# request's sync thread), not to the event loop's, so the schema comes from the request.


def _current_schema() -> str:
    with connection.cursor() as cursor:
        cursor.execute("SELECT current_schema()")
        return str(cursor.fetchone()[0])


async def async_add_note(request: HttpRequest) -> JsonResponse:
    note = await Note.objects.acreate(title=request.GET["title"])
    return JsonResponse(
        {
            "schema": request.tenant.schema_name,  # type: ignore[attr-defined]
            "current_schema": await sync_to_async(_current_schema)(),
            "note": note.pk,
            "notes": await Note.objects.acount(),
            "products": [p.name async for p in Product.objects.order_by("name").aiterator(2)],
        }
    )


async def async_first_product(request: HttpRequest) -> JsonResponse:
    """Leaves ``async for`` over ``aiterator()`` after the first row; with ``?then=count``
    the connection runs another statement before the request ends."""
    first = None
    async for product in Product.objects.order_by("name").aiterator(chunk_size=1):
        first = product.name
        break
    body: dict[str, object] = {"schema": request.tenant.schema_name, "first": first}  # type: ignore[attr-defined]
    if request.GET.get("then") == "count":
        body["count"] = await Product.objects.acount()
    return JsonResponse(body)
