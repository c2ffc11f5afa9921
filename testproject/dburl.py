from __future__ import annotations

from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit


def parse_database_url(url: str) -> dict[str, Any]:
    """The subset of dj-database-url that a PostgreSQL DATABASE_URL needs."""
    parts = urlsplit(url)
    if parts.scheme not in {"postgres", "postgresql", "pgsql"}:
        raise ValueError(f"DATABASE_URL must be a postgres:// URL, got {parts.scheme!r}")
    return {
        "ENGINE": "django_tenants.postgresql_backend",
        "NAME": unquote(parts.path.lstrip("/")) or "postgres",
        "USER": unquote(parts.username or ""),
        "PASSWORD": unquote(parts.password or ""),
        "HOST": parts.hostname or "",
        "PORT": str(parts.port or ""),
        "OPTIONS": dict(parse_qsl(parts.query)),
    }
