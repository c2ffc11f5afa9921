"""The ``_skip_auto_migrate`` contract: any tenant model, no change to it.

While an instance has ``_skip_auto_migrate`` set, saving it never creates or migrates a schema
(``tenantsafe.testing.create_tenant`` sets it and provisions the schema itself).
"""

from __future__ import annotations

from typing import Any

from django.db.models import Model
from django_tenants.models import TenantMixin


def honour_skip_auto_migrate(sender: type[Model], instance: Model, **kwargs: Any) -> None:
    """``pre_save`` receiver: while ``_skip_auto_migrate`` is set, save() leaves schemas alone.

    TenantMixin.save() reads ``self.auto_create_schema`` after Django's save (so after
    pre_save); an instance attribute shadows the class's for exactly that instance.
    """
    if not isinstance(instance, TenantMixin):
        return
    state = instance.__dict__
    if getattr(instance, "_skip_auto_migrate", False):
        if not state.get("_tenantsafe_auto_create_overridden"):
            state["_tenantsafe_auto_create_overridden"] = True
            state["_tenantsafe_auto_create_before"] = state.get("auto_create_schema", _UNSET)
        state["auto_create_schema"] = False
    elif state.pop("_tenantsafe_auto_create_overridden", False):
        before = state.pop("_tenantsafe_auto_create_before", _UNSET)
        if before is _UNSET:
            state.pop("auto_create_schema", None)
        else:
            state["auto_create_schema"] = before


_UNSET = object()
