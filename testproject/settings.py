from __future__ import annotations

import json
import os

from testproject.dburl import parse_database_url

SECRET_KEY = "tenantsafe-testproject-not-secret"
DEBUG = False
ALLOWED_HOSTS = ["*"]
USE_TZ = True
ROOT_URLCONF = "testproject.urls"
PUBLIC_SCHEMA_URLCONF = "testproject.urls_public"
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

DATABASES = {
    "default": parse_database_url(
        os.environ.get("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/tenantsafe")
    )
}
# A second entry that reaches PostgreSQL directly while "default" goes through a pooler: what
# migrate_schemas_safe --database direct uses for migrations a pooler cannot carry.
if os.environ.get("DATABASE_DIRECT_URL"):
    DATABASES["direct"] = parse_database_url(os.environ["DATABASE_DIRECT_URL"])
DATABASE_ROUTERS = ["django_tenants.routers.TenantSyncRouter"]

SHARED_APPS = [
    "django_tenants",
    "testproject.customers",
    "django.contrib.contenttypes",
    "django.contrib.auth",
    "tenantsafe",
]
TENANT_APPS = [
    "django.contrib.contenttypes",
    "django.contrib.auth",
    "testproject.shop",
    "testproject.notes",
]
# The search app holds a non-atomic migration (CREATE INDEX CONCURRENTLY), which cannot run
# through a transaction pooler; a project deployed through one leaves it out.
if os.environ.get("TESTPROJECT_POOLER_SAFE") != "1":
    TENANT_APPS.append("testproject.search")

INSTALLED_APPS = list(SHARED_APPS) + [app for app in TENANT_APPS if app not in SHARED_APPS]

# For tests that deploy a new migration in a subprocess: {"app": "package", ...} as JSON.
if os.environ.get("TESTPROJECT_MIGRATION_MODULES"):
    MIGRATION_MODULES = json.loads(os.environ["TESTPROJECT_MIGRATION_MODULES"])

# For the fault tests: a short lock lease, and as many migrating processes as a pool has.
if os.environ.get("TESTPROJECT_LOCK_LEASE_SECONDS"):
    TENANTSAFE_LOCK_LEASE_SECONDS = int(os.environ["TESTPROJECT_LOCK_LEASE_SECONDS"])
if os.environ.get("TESTPROJECT_MAX_PROCESSES"):
    TENANT_MULTIPROCESSING_MAX_PROCESSES = int(os.environ["TESTPROJECT_MAX_PROCESSES"])

# For the servers the integration tests start (uvicorn, Celery workers): the guard, how long
# connections are kept ("none": for ever), Django's connection pool, the broker and
# tenant-schemas-celery's tenant cache.
if os.environ.get("TESTPROJECT_RUNTIME_GUARD"):
    TENANTSAFE_RUNTIME_GUARD = os.environ["TESTPROJECT_RUNTIME_GUARD"] == "1"
if os.environ.get("TESTPROJECT_CONN_MAX_AGE"):
    _age = os.environ["TESTPROJECT_CONN_MAX_AGE"]
    DATABASES["default"]["CONN_MAX_AGE"] = None if _age == "none" else int(_age)
if os.environ.get("TESTPROJECT_DB_POOL") == "1":
    DATABASES["default"]["OPTIONS"]["pool"] = {"min_size": 2, "max_size": 8, "timeout": 20}
CELERY_BROKER_URL = os.environ.get("TESTPROJECT_REDIS_URL", "redis://127.0.0.1:6379/0")
CELERY_RESULT_BACKEND = CELERY_BROKER_URL
CELERY_WORKER_HIJACK_ROOT_LOGGER = False
if os.environ.get("TESTPROJECT_TENANT_CACHE_SECONDS"):
    CELERY_TASK_TENANT_CACHE_SECONDS = int(os.environ["TESTPROJECT_TENANT_CACHE_SECONDS"])

TENANT_MODEL = "customers.Client"
TENANT_DOMAIN_MODEL = "customers.Domain"

MIDDLEWARE = [
    "django_tenants.middleware.main.TenantMainMiddleware",
    "django.middleware.common.CommonMiddleware",
]

TEMPLATES: list[dict[str, object]] = []

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "loggers": {
        "tenantsafe": {
            "handlers": ["console"],
            "level": os.environ.get("TENANTSAFE_LOG_LEVEL", "WARNING"),
        }
    },
}
