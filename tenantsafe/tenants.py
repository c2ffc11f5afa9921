"""Tenant rows as runs see them: (schema, tenant type), read in one query."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from django_tenants.utils import (
    get_multi_type_database_field_name,
    get_public_schema_name,
    get_tenant_model,
    has_multi_type_tenants,
)

from tenantsafe.results import TenantRef


def refs(
    alias: str, *, schema: str | None = None, order: Sequence[str] | None = ("schema_name",)
) -> list[TenantRef]:
    """Every tenant but public (or the ones with ``schema``), in ``order``."""
    type_field = get_multi_type_database_field_name() if has_multi_type_tenants() else None
    fields = ["schema_name", type_field] if type_field else ["schema_name"]
    queryset = get_tenant_model()._default_manager.db_manager(alias).all()
    if schema is None:
        queryset = queryset.exclude(schema_name=get_public_schema_name())
    else:
        queryset = queryset.filter(schema_name=schema)
    if order:
        queryset = queryset.order_by(*order)
    return [
        TenantRef(row[0], str(row[1]) if len(row) > 1 and row[1] is not None else "")
        for row in queryset.values_list(*fields)
    ]


def tenant_type(tenant: Any) -> str:
    if not has_multi_type_tenants():
        return ""
    return str(getattr(tenant, get_multi_type_database_field_name()) or "")
