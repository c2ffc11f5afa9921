"""pytest plugin (loaded through the ``pytest11`` entry point): tenants for pytest-django tests.

Importable without Django configured: Django and tenantsafe.testing are imported inside the
fixtures. Nothing touches the database unless a test asks for one of the fixtures below.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

FieldsFor = Callable[[str], "dict[str, Any]"]


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addini(
        "tenantsafe_tenants",
        type="args",
        default=[],
        help="tenantsafe: schema names of the tenants created once per session (the first is "
        "the `tenant` fixture's). Default: TENANTSAFE_TEST_TENANTS, else test_tenant.",
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "tenant(schema_name, **fields): the tenant the `tenant` and `tenant_client` fixtures "
        "activate for this test, created through create_tenant if it does not exist.",
    )


def _names(config: pytest.Config) -> list[str]:
    from tenantsafe.testing import default_schema_names

    names = [str(name) for name in config.getini("tenantsafe_tenants")]
    return list(dict.fromkeys(names)) or default_schema_names()


def _create(fields_for: FieldsFor, schema_name: str, **overrides: Any) -> Any:
    from tenantsafe.errors import MissingTenantFields
    from tenantsafe.testing import create_tenant

    fields = {**fields_for(schema_name), **overrides}
    domain = fields.pop("domain", None)
    try:
        return create_tenant(schema_name, domain=domain, **fields)
    except MissingTenantFields as exc:
        pytest.fail(
            f"{exc}\nFor the tenantsafe fixtures, return them from a `tenantsafe_tenant_fields` "
            "fixture in conftest.py (a dict, or a function of the schema name).",
            pytrace=False,
        )


@pytest.fixture(scope="session")
def tenantsafe_tenant_fields() -> dict[str, Any] | FieldsFor:
    """Model fields for the tenants the fixtures create; override it in conftest.py.

    A dict used for every tenant, or a function taking the schema name and returning one. A
    ``domain`` key is passed to create_tenant as the tenant's domain.
    """
    return {}


@pytest.fixture(scope="session")
def _tenantsafe_fields_for(tenantsafe_tenant_fields: dict[str, Any] | FieldsFor) -> FieldsFor:
    value = tenantsafe_tenant_fields
    if callable(value):
        return lambda name: dict(value(name))
    return lambda name: dict(value)


@pytest.fixture(scope="session")
def tenants(
    request: pytest.FixtureRequest,
    django_db_setup: None,
    django_db_blocker: Any,
    _tenantsafe_fields_for: FieldsFor,
) -> dict[str, Any]:
    """The session's tenants (ini ``tenantsafe_tenants``), by schema name, in that order.

    Created after ``django_db_setup`` (so in each xdist worker's own database, or once in a
    shared one: create_tenant serializes workers and returns the existing tenant to the
    others) and kept with ``--reuse-db``.
    """
    with django_db_blocker.unblock():
        return {name: _create(_tenantsafe_fields_for, name) for name in _names(request.config)}


@pytest.fixture
def tenant(
    request: pytest.FixtureRequest,
    tenants: dict[str, Any],
    db: None,
    _tenantsafe_fields_for: FieldsFor,
) -> Iterator[Any]:
    """The first session tenant (or the ``tenant`` marker's), active on the connection.

    Its data lives in the test's transaction (the ``db`` fixture), so it is rolled back after
    the test; the connection is back on public afterwards.
    """
    from django.db import connections
    from django_tenants.utils import get_tenant_database_alias

    marker = request.node.get_closest_marker("tenant")
    if marker is not None:
        obj = _create(_tenantsafe_fields_for, *marker.args, **marker.kwargs)
    else:
        if not tenants:
            pytest.fail("tenantsafe: the `tenant` fixture needs at least one session tenant")
        name = next(iter(tenants))
        obj = tenants[name]
        if not _still_there(obj):
            # A transactional test elsewhere flushed the row or dropped the schema:
            # create_tenant puts back what is missing.
            obj = tenants[name] = _create(_tenantsafe_fields_for, name)
    connection: Any = connections[get_tenant_database_alias()]
    connection.set_tenant(obj)
    try:
        yield obj
    finally:
        connection.set_schema_to_public()


def _still_there(tenant: Any) -> bool:
    from django_tenants.utils import get_tenant_database_alias, get_tenant_model

    from tenantsafe import schemas

    alias = get_tenant_database_alias()
    manager = get_tenant_model()._default_manager.db_manager(alias)
    exists = manager.filter(pk=tenant.pk, schema_name=tenant.schema_name).exists()
    return bool(exists) and schemas.exists(alias, tenant.schema_name)


@pytest.fixture
def tenant_client(tenant: Any) -> Iterator[Any]:
    """A Django test client whose requests reach ``tenant`` through its primary domain."""
    from django.conf import settings
    from django.test.utils import override_settings
    from django_tenants.test.client import TenantClient

    domain = tenant.get_primary_domain().domain
    hosts = list(settings.ALLOWED_HOSTS)
    if "*" in hosts or domain in hosts:
        yield TenantClient(tenant)
        return
    with override_settings(ALLOWED_HOSTS=[*hosts, domain]):
        yield TenantClient(tenant)


@pytest.fixture
def tenant_factory(
    django_db_setup: None, django_db_blocker: Any, _tenantsafe_fields_for: FieldsFor
) -> Callable[..., Any]:
    """``tenant_factory(schema_name, **fields)``: create_tenant with the fixtures' fields.

    The tenant is committed and outlives the test (a later call returns it again).
    """

    def make(schema_name: str, **fields: Any) -> Any:
        with django_db_blocker.unblock():
            return _create(_tenantsafe_fields_for, schema_name, **fields)

    return make
