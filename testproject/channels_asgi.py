"""The test project behind Django Channels' router: ``/channels/products/`` is a Channels
consumer, everything else Django's ASGI application.
``uvicorn testproject.channels_asgi:application``."""

from __future__ import annotations

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "testproject.settings")
django_application = get_asgi_application()

# After Django is set up: the consumer imports models.
from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402
from django.urls import path, re_path  # noqa: E402

from testproject.consumers import ProductsConsumer  # noqa: E402

application = ProtocolTypeRouter(
    {
        "http": URLRouter(
            [
                path("channels/products/", ProductsConsumer.as_asgi()),
                re_path(r"", django_application),
            ]
        )
    }
)
