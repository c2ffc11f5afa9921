"""tenantsafe's system checks: each one by its id, message and hint."""

from __future__ import annotations

import io
import textwrap
import uuid
from pathlib import Path
from typing import Any

import pytest
from django.conf import settings
from django.core import checks
from django.core.management import call_command
from django.core.management.base import CommandError, SystemCheckError
from django.test import override_settings
from django_tenants.routers import TenantSyncRouter

from tenantsafe.checks import rollback_forgets_search_path
from tests.dbtools import direct_url, manage, pool_load, pooled_url

NO_ISSUES = "System check identified no issues (0 silenced)."


class ProjectRouter(TenantSyncRouter):  # type: ignore[misc]
    pass


def issues(databases: list[str] | None = None) -> list[tuple[str | None, str, str]]:
    return [
        (m.id, m.msg, m.hint or "")
        for m in checks.run_checks(databases=databases)
        if (m.id or "").startswith("tenantsafe.")
    ]


def ids(databases: list[str] | None = None) -> list[str | None]:
    return [i for i, _, _ in issues(databases)]


# The checks read DATABASES at call time; no connection is made from the overridden entry.
overrides_databases = pytest.mark.filterwarnings("ignore:Overriding setting DATABASES")


def database(**changes: Any) -> dict[str, Any]:
    return {**settings.DATABASES, "default": {**settings.DATABASES["default"], **changes}}


def test_healthy_project_passes_check():
    assert issues() == []
    result = manage(direct_url(), "check", "--database", "default")
    assert result.returncode == 0, result.stderr
    assert NO_ISSUES in result.stdout
    assert "tenantsafe." not in result.stderr


@overrides_databases
def test_e001_backend_that_is_not_django_tenants():
    engine = "django.db.backends.postgresql"
    with override_settings(DATABASES=database(ENGINE=engine)):
        assert issues() == [
            (
                "tenantsafe.E001",
                "DATABASES['default'] uses the database backend 'django.db.backends.postgresql', "
                "which is not django-tenants' backend or a subclass of it.",
                "Set DATABASES['default']['ENGINE'] to 'django_tenants.postgresql_backend', or "
                "to a backend whose DatabaseWrapper subclasses django-tenants'. Without it no "
                "search_path is set and every tenant reads and writes public.",
            )
        ]
    with override_settings(TENANT_DB_ALIAS="tenants"):
        assert issues()[0][:2] == (
            "tenantsafe.E001",
            "The tenant database alias 'tenants' (TENANT_DB_ALIAS) is not in DATABASES.",
        )


@overrides_databases
def test_e001_fails_manage_check_with_the_hint():
    out, err = io.StringIO(), io.StringIO()
    with (
        override_settings(DATABASES=database(ENGINE="django.db.backends.postgresql")),
        pytest.raises(SystemCheckError) as raised,
    ):
        call_command("check", stdout=out, stderr=err)
    text = str(raised.value)
    assert "?: (tenantsafe.E001) DATABASES['default'] uses the database backend" in text
    assert (
        "\tHINT: Set DATABASES['default']['ENGINE'] to 'django_tenants.postgresql_backend'" in text
    )


def test_e002_router_missing_and_subclass_accepted():
    with override_settings(DATABASE_ROUTERS=[]):
        assert issues() == [
            (
                "tenantsafe.E002",
                "DATABASE_ROUTERS does not include django-tenants' TenantSyncRouter or a "
                "subclass of it.",
                "Add 'django_tenants.routers.TenantSyncRouter' to DATABASE_ROUTERS. Without it "
                "migrate creates the tables of every app in every schema, tenant tables in "
                "public included.",
            )
        ]
    with override_settings(DATABASE_ROUTERS=["tests.test_checks.ProjectRouter"]):
        assert issues() == []
    with override_settings(DATABASE_ROUTERS=[ProjectRouter()]):
        assert issues() == []


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("", "TENANT_MODEL is not set."),
        ("customers.Nope", "TENANT_MODEL = 'customers.Nope' does not name an installed model."),
        (
            "customers.Domain",
            "TENANT_MODEL = 'customers.Domain' names a model that does not subclass "
            "django_tenants.models.TenantMixin.",
        ),
    ],
)
def test_e003_tenant_model(value, message):
    with override_settings(TENANT_MODEL=value):
        assert issues() == [
            (
                "tenantsafe.E003",
                message,
                "Set TENANT_MODEL to 'app_label.ModelName' of your tenant model, a subclass of "
                "django_tenants.models.TenantMixin in an app of SHARED_APPS.",
            )
        ]


def test_e004_domain_model():
    with override_settings(TENANT_DOMAIN_MODEL="customers.Client"):
        assert issues() == [
            (
                "tenantsafe.E004",
                "TENANT_DOMAIN_MODEL = 'customers.Client' names a model that does not subclass "
                "django_tenants.models.DomainMixin.",
                "Set TENANT_DOMAIN_MODEL to 'app_label.ModelName' of your domain model, a "
                "subclass of django_tenants.models.DomainMixin in an app of SHARED_APPS.",
            )
        ]


def test_e005_listed_app_not_installed():
    with override_settings(TENANT_APPS=[*settings.TENANT_APPS, "billing"]):
        assert issues() == [
            (
                "tenantsafe.E005",
                "TENANT_APPS lists 'billing', which is not in INSTALLED_APPS.",
                "Add 'billing' to INSTALLED_APPS (django-tenants migrates installed apps only) "
                "or remove it from TENANT_APPS.",
            )
        ]


def test_app_config_paths_count_as_installed():
    shared = [*settings.SHARED_APPS, "django.contrib.auth.apps.AuthConfig"]
    with override_settings(SHARED_APPS=shared):
        assert issues() == []


def test_e006_tenant_model_app_not_shared():
    shared = [a for a in settings.SHARED_APPS if a != "testproject.customers"]
    with override_settings(
        SHARED_APPS=shared, TENANT_APPS=[*settings.TENANT_APPS, "testproject.customers"]
    ):
        found = issues()
    assert found == [
        (
            "tenantsafe.E006",
            f"The app of {setting} ('testproject.customers') is not in SHARED_APPS, so its "
            "table is never created in public.",
            "Add 'testproject.customers' to SHARED_APPS: django-tenants looks tenants and "
            "domains up in the public schema.",
        )
        for setting in ("TENANT_MODEL", "TENANT_DOMAIN_MODEL")
    ]


def test_w001_app_with_models_in_no_list():
    tenant = [a for a in settings.TENANT_APPS if a != "testproject.notes"]
    with override_settings(TENANT_APPS=tenant):
        assert issues() == [
            (
                "tenantsafe.W001",
                "The installed app 'notes' has models but is in neither SHARED_APPS nor "
                "TENANT_APPS, so migrate creates its tables in no schema.",
                "Add it to SHARED_APPS (tables in public), TENANT_APPS (tables in every tenant "
                "schema) or both.",
            )
        ]


def test_multi_type_app_lists():
    types: dict[str, dict[str, Any]] = {
        "public": {"APPS": list(settings.SHARED_APPS), "URLCONF": "testproject.urls_public"},
        "shop": {"APPS": list(settings.TENANT_APPS), "URLCONF": "testproject.urls"},
    }
    with override_settings(HAS_MULTI_TYPE_TENANTS=True, TENANT_TYPES=types):
        assert issues() == []
    types["public"]["APPS"] = [a for a in settings.SHARED_APPS if a != "testproject.customers"]
    types["shop"]["APPS"].append("nope")
    with override_settings(HAS_MULTI_TYPE_TENANTS=True, TENANT_TYPES=types):
        found = issues()
    assert [(i, m) for i, m, _ in found] == [
        (
            "tenantsafe.E005",
            "TENANT_TYPES['shop']['APPS'] lists 'nope', which is not in INSTALLED_APPS.",
        ),
        (
            "tenantsafe.E006",
            "The app of TENANT_MODEL ('testproject.customers') is not in "
            "TENANT_TYPES['public']['APPS'], so its table is never created in public.",
        ),
        (
            "tenantsafe.E006",
            "The app of TENANT_DOMAIN_MODEL ('testproject.customers') is not in "
            "TENANT_TYPES['public']['APPS'], so its table is never created in public.",
        ),
        (
            "tenantsafe.W001",
            "The installed app 'customers' has models but is in no TENANT_TYPES[...]['APPS'] "
            "list, so migrate creates its tables in no schema.",
        ),
    ]


@pytest.mark.parametrize("value", ["migrate", "replay", None])
def test_supported_provisioning_settings_pass(value):
    with override_settings(
        TENANTSAFE_PROVISIONING=value,
        TENANTSAFE_SPARE_SCHEMAS=5 if value == "replay" else 0,
        TENANTSAFE_RECORDING_WAIT_SECONDS=0.5,
    ):
        assert issues() == []


@pytest.mark.parametrize("value", ["Replay", "clone", "", True])
def test_e007_unknown_provisioning_mode(value):
    with override_settings(TENANTSAFE_PROVISIONING=value):
        assert issues() == [
            (
                "tenantsafe.E007",
                f"TENANTSAFE_PROVISIONING = {value!r} is neither 'migrate' nor 'replay', so new "
                "tenants are migrated, as without the setting.",
                "Set TENANTSAFE_PROVISIONING = 'replay' to provision new tenants by replay, or "
                "remove it (or set 'migrate') to keep django-tenants' migrating save().",
            )
        ]


@pytest.mark.parametrize("value", [-1, 2.5, "5", True, [3]])
def test_e008_spare_schemas_not_a_count(value):
    with override_settings(TENANTSAFE_SPARE_SCHEMAS=value):
        assert issues() == [
            (
                "tenantsafe.E008",
                f"TENANTSAFE_SPARE_SCHEMAS = {value!r} is not a whole number of 0 or more.",
                "Set it to how many spare schemas to keep provisioned ahead, an int such as 5, "
                "or to 0 for none.",
            )
        ]


@pytest.mark.parametrize("value", [-1, "60", False])
def test_e009_recording_wait_not_seconds(value):
    with override_settings(TENANTSAFE_RECORDING_WAIT_SECONDS=value):
        assert ids() == ["tenantsafe.E009"]
        ((_, message, hint),) = issues()
    assert message == (
        f"TENANTSAFE_RECORDING_WAIT_SECONDS = {value!r} is not a number of seconds of 0 or more."
    )
    assert hint.startswith("Set it to how long a new tenant's provisioning may wait")


def test_w005_spare_schemas_with_multi_type_tenants():
    types = {
        "public": {"APPS": list(settings.SHARED_APPS), "URLCONF": "testproject.urls_public"},
        "shop": {"APPS": list(settings.TENANT_APPS), "URLCONF": "testproject.urls"},
    }
    multi = {"HAS_MULTI_TYPE_TENANTS": True, "TENANT_TYPES": types}
    with override_settings(**multi, TENANTSAFE_SPARE_SCHEMAS=0):
        assert issues() == []
    with override_settings(**multi, TENANTSAFE_SPARE_SCHEMAS=3):
        assert issues() == [
            (
                "tenantsafe.W005",
                "TENANTSAFE_SPARE_SCHEMAS is 3, but spare schemas do not support multi-type "
                "tenants (TENANT_TYPES) yet: migrate_schemas_safe makes none and "
                "tenantsafe_spares refuses to run, so every new tenant is replayed or migrated.",
                "Remove TENANTSAFE_SPARE_SCHEMAS (or set it to 0) while HAS_MULTI_TYPE_TENANTS "
                "is on, and any cron job that runs tenantsafe_spares.",
            )
        ]
        # What the warning says of the command.
        with pytest.raises(CommandError, match="does not support multi-type tenants"):
            call_command("tenantsafe_spares", skip_checks=True)


@pytest.mark.parametrize("value", ["migrate", None])
def test_w006_spare_schemas_that_save_never_claims(value):
    with override_settings(TENANTSAFE_PROVISIONING=value, TENANTSAFE_SPARE_SCHEMAS=2):
        assert issues() == [
            (
                "tenantsafe.W006",
                "TENANTSAFE_SPARE_SCHEMAS is 2, but TENANTSAFE_PROVISIONING is not 'replay': "
                "saving a new tenant migrates its schema and never claims a spare, so the spares "
                "migrate_schemas_safe and tenantsafe_spares keep go unused (only "
                "tenantsafe.provisioning.provision() claims them).",
                "Set TENANTSAFE_PROVISIONING = 'replay', or remove TENANTSAFE_SPARE_SCHEMAS (or "
                "set it to 0) if new tenants are not provisioned with provision().",
            )
        ]


def test_provisioning_checks_fail_manage_check_with_the_hint():
    with (
        override_settings(TENANTSAFE_PROVISIONING="Replay"),
        pytest.raises(SystemCheckError) as raised,
    ):
        call_command("check", stdout=io.StringIO(), stderr=io.StringIO())
    text = str(raised.value)
    assert "?: (tenantsafe.E007) TENANTSAFE_PROVISIONING = 'Replay' is neither" in text
    assert "\tHINT: Set TENANTSAFE_PROVISIONING = 'replay' to provision" in text


@pytest.fixture
def unfixed_backend(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A backend like django-tenants' before the rollback fix: its rollbacks keep the cache."""
    package = f"oldtenants_{uuid.uuid4().hex[:8]}"
    (tmp_path / package).mkdir()
    (tmp_path / package / "__init__.py").write_text("")
    (tmp_path / package / "base.py").write_text(
        textwrap.dedent("""\
        from django_tenants.postgresql_backend import base

        class DatabaseWrapper(base.DatabaseWrapper):
            rollback = base.original_backend.DatabaseWrapper.rollback
            savepoint_rollback = base.original_backend.DatabaseWrapper.savepoint_rollback
        """)
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    return package


@overrides_databases
def test_w002_limit_set_calls_on_a_backend_without_the_rollback_fix(unfixed_backend):
    from django.db.utils import load_backend
    from django_tenants.postgresql_backend.base import DatabaseWrapper

    assert rollback_forgets_search_path(DatabaseWrapper)
    assert not rollback_forgets_search_path(load_backend(unfixed_backend).DatabaseWrapper)

    with override_settings(TENANT_LIMIT_SET_CALLS=True):
        assert issues() == []  # the installed django-tenants has the fix
    with override_settings(DATABASES=database(ENGINE=unfixed_backend)):
        assert issues() == []  # the setting is off
    with override_settings(DATABASES=database(ENGINE=unfixed_backend), TENANT_LIMIT_SET_CALLS=True):
        assert issues() == [
            (
                "tenantsafe.W002",
                "TENANT_LIMIT_SET_CALLS is on, but the installed django-tenants backend keeps "
                "its cached search_path after a rollback.",
                "PostgreSQL undoes a SET search_path with the transaction (or savepoint) that "
                "issued it; this backend still believes the path is set and skips the SET, so "
                "the next queries run in public or in the previous tenant. Upgrade "
                "django-tenants to a release whose backend clears search_path_set_schemas in "
                "rollback() and savepoint_rollback() (4.0.1 does), or set "
                "TENANT_LIMIT_SET_CALLS = False.",
            )
        ]


W003 = (
    "tenantsafe.W003",
    "Database 'default' reaches PostgreSQL through a transaction pooler, which can run "
    "django-tenants' SET search_path and the statements after it on different server "
    "connections.",
    "Migrate with migrate_schemas_safe (not migrate_schemas or migrate), which pins the "
    "search_path to every statement; run non-atomic migrations over a direct connection; set "
    "TENANTSAFE_RUNTIME_GUARD = True to guard requests too. If nothing pools in between, set "
    "TENANTSAFE_TRANSACTION_POOLER = False.",
)


@pytest.mark.pooler
def test_w003_transaction_pooler_found_by_check_database():
    url = pooled_url()
    with pool_load(url, ["public"]):
        result = manage(url, "check", "--database", "default")
    assert result.returncode == 0, result.stderr  # a warning: reported, not fatal
    assert f"?: ({W003[0]}) {W003[1]}\n\tHINT: {W003[2]}" in result.stderr
    assert "System check identified 1 issue (0 silenced)." in result.stderr

    # Database checks run only for the aliases check is given.
    with pool_load(url, ["public"]):
        result = manage(url, "check")
    assert result.returncode == 0
    assert NO_ISSUES in result.stdout


@pytest.mark.django_db
def test_w003_follows_the_setting_and_the_guard():
    assert issues(["default"]) == []
    with override_settings(TENANTSAFE_TRANSACTION_POOLER=True):
        assert issues(["default"]) == [W003]
        assert issues() == []
        with override_settings(TENANTSAFE_RUNTIME_GUARD=True):
            assert issues(["default"]) == []
    with override_settings(TENANTSAFE_TRANSACTION_POOLER={"default": True}):
        assert ids(["default"]) == ["tenantsafe.W003"]


def test_w004_unreachable_database():
    url = direct_url().rsplit("/", 1)[0] + "/no_such_database"
    result = manage(url, "check", "--database", "default")
    assert result.returncode == 0
    assert "(tenantsafe.W004) Could not ask database 'default' whether a transaction pooler is" in (
        result.stderr
    )
    assert 'database "no_such_database" does not exist' in result.stderr
