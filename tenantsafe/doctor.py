"""``tenantsafe_doctor``: the state of every tenant, read in a few queries.

Tenant rows without a schema, schemas that look like tenants (they hold ``django_migrations``)
without a row, tenants behind on migrations and what each one misses, tenant-app tables in
public, the pooler in front of the connection, and tenantsafe's system check messages.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from typing import Any

from django.apps import apps
from django.conf import settings
from django.core import checks
from django.db import connections
from django_tenants.utils import (
    get_public_schema_name,
    get_tenant_types,
    get_type_base_schemas,
    has_multi_type_tenants,
)

from tenantsafe import conf, drift, guard, memory, plan, schemas, sharding, spares, tenants
from tenantsafe.findings import ERROR, INFO, LEVELS, WARNING, Finding, Report, quoted, render
from tenantsafe.guard import pooler
from tenantsafe.meanwhile import in_halves, meanwhile
from tenantsafe.results import TenantRef

__all__ = ["ERROR", "INFO", "LEVELS", "WARNING", "Finding", "Report", "diagnose", "render"]


def diagnose(alias: str) -> Report:
    # The checks first, as `manage.py check` sees the project (W003 reports an unguarded
    # pooler); the reads after them under the guard, which behind a pooler they need.
    checked = _check_messages(alias)
    with guard.guarding(alias):
        return _diagnose(alias, checked)


def _diagnose(alias: str, checked: list[Finding]) -> Report:
    started = time.monotonic()
    report = Report(database=alias)
    connection: Any = connections[alias]
    connection.set_schema_to_public()
    public = get_public_schema_name()

    report.findings.extend(checked)
    rows = tenants.refs(alias)
    report.tenants = len(rows)
    named = {ref.schema for ref in rows}
    valid: list[TenantRef] = []
    for ref in rows:
        reason = schemas.problem(ref.schema)
        if not reason:
            valid.append(ref)
            continue
        report.findings.append(
            Finding(
                ERROR,
                "invalid-schema-name",
                ref.schema,
                f"The tenant row for {quoted(ref.schema)} names an invalid schema ({reason}): "
                "no schema can be created or migrated for it. Rename it or delete the row.",
            )
        )
    report.findings.extend(_collisions(rows))

    namespaces = _namespaces(alias)
    for schema, _ in valid:
        if schema not in namespaces:
            report.findings.append(
                Finding(
                    ERROR,
                    "missing-schema",
                    schema,
                    f"The tenant row for {quoted(schema)} has no schema. Create and migrate it "
                    "with migrate_schemas_safe --create-missing, or delete the row.",
                )
            )
    templates = {getattr(settings, "TENANT_BASE_SCHEMA", None), *get_type_base_schemas().values()}
    for schema, tables in sorted(namespaces.items()):
        if (
            "django_migrations" in tables
            and schema != public
            and schema not in named
            and schema not in templates
            # Spare schemas are tenant schemas provisioned ahead, without a row until claimed.
            and not spares.is_spare(schema)
        ):
            report.findings.append(
                Finding(
                    WARNING,
                    "schema-without-tenant",
                    schema,
                    f"Schema {quoted(schema)} holds a django_migrations table, but no tenant row "
                    "names it. Drop it if its tenant is gone, or add the tenant row back.",
                )
            )

    present = [TenantRef(public)] + [ref for ref in valid if ref.schema in namespaces]
    _read_tenants(alias, report, present, namespaces)

    report.findings.extend(_tenant_tables_in_public(alias, public, rows))
    report.pooler = _pooler(alias)
    report.findings.append(Finding(INFO, "pooler", None, report.pooler["description"]))
    report.citus, found = sharding.findings(
        alias, [r.schema for r in valid if r.schema in namespaces]
    )
    report.findings.extend(found)
    report.elapsed = time.monotonic() - started
    return report


def _read_tenants(
    alias: str, report: Report, present: list[TenantRef], namespaces: dict[str, set[str]]
) -> None:
    """What grows with the tenants: migrations behind, content types and permissions,
    catalog drift, catalog memory; public first in ``present``."""
    public = present[0].schema
    complete: set[str] = set()
    tenants_present = present[1:]
    # The reads that grow with the tenants, on up to four connections at once: the catalogs,
    # the costliest (about 1 ms a tenant: 12 of the 20 s of CPU at 10,000), in two halves when
    # they take more than one query.
    names = [t.schema for t in tenants_present]
    with (
        meanwhile(
            alias,
            lambda: in_halves(
                alias, lambda part: drift.catalogs_of(alias, part), names, above=drift.CHUNK
            ),
        ) as digests,
        meanwhile(alias, lambda: _registry_lag(alias, tenants_present, namespaces)) as lagging,
    ):
        entries = plan.plan_schemas(alias, present)
        for entry in entries:
            if entry.duplicates:
                report.findings.append(_duplicates(entry))
            finding = _behind(entry, public)
            if finding is None:
                report.current += entry.schema != public
            else:
                report.findings.append(finding)
            if entry.schema != public and entry.plan is not None and entry.plan.empty:
                complete.add(entry.schema)
        # Only tenants with every migration are expected to have every content type.
        report.findings.extend(f for f in lagging() if f.schema in complete)
        found = {name: digest for part in digests() for name, digest in part.items()}
    report.findings.extend(_drifted(alias, [e for e in entries if e.schema != public], found))
    sample = next((e.schema for e in entries if e.schema != public and e.current), None)
    if sample is not None:
        cost = memory.estimate(alias, len(present) - 1, sample)
        report.catalog_memory = cost.as_json()
        report.findings.extend(filter(None, [cost.finding()]))


def _collisions(rows: list[TenantRef]) -> list[Finding]:
    # PostgreSQL cuts names to 63 bytes: rows that agree in those land in one schema.
    stored: dict[str, list[str]] = {}
    for ref in rows:
        if isinstance(ref.schema, str):
            stored.setdefault(schemas.truncated(ref.schema), []).append(ref.schema)
    return [
        Finding(
            ERROR,
            "schema-name-collision",
            name,
            f"The tenant rows for {', '.join(quoted(n) for n in names)} all name schema "
            f"{quoted(name)} once PostgreSQL cuts them to 63 bytes: they would read and write "
            "one schema. Rename all but one of them.",
            {"rows": names},
        )
        for name, names in sorted(stored.items())
        if len(names) > 1
    ]


def _check_messages(alias: str) -> list[Finding]:
    found = []
    for message in checks.run_checks(databases=[alias]):
        if not (message.id or "").startswith("tenantsafe.") or message.is_silenced():
            continue
        level = (
            ERROR
            if message.level >= checks.ERROR
            else WARNING
            if message.level >= checks.WARNING
            else INFO
        )
        text = f"{message.msg} {message.hint}" if message.hint else str(message.msg)
        found.append(Finding(level, "check", None, text, {"id": message.id}))
    return found


def _namespaces(alias: str) -> dict[str, set[str]]:
    """Every non-system schema, and which of the tables the doctor reads it holds."""
    with connections[alias].cursor() as cursor:
        cursor.execute(
            "SELECT n.nspname, array_remove(array_agg(c.relname::text), NULL) "
            "FROM pg_catalog.pg_namespace n LEFT JOIN pg_catalog.pg_class c "
            "ON c.relnamespace = n.oid AND c.relkind IN ('r', 'p') AND c.relname IN "
            "('django_migrations', 'django_content_type', 'auth_permission') "
            "WHERE n.nspname NOT LIKE 'pg\\_%%' AND n.nspname <> 'information_schema' "
            "GROUP BY n.nspname"
        )
        return {name: set(tables) for name, tables in cursor.fetchall()}


def _behind(entry: plan.SchemaPlan, public: str) -> Finding | None:
    who = "The public schema" if entry.schema == public else f"Tenant {quoted(entry.schema)}"
    if not entry.has_table:
        return Finding(
            WARNING,
            "behind",
            entry.schema,
            f"{who} has no django_migrations table: it was never migrated. Run "
            "migrate_schemas_safe.",
            {"missing": "all"},
        )
    if entry.plan is None:
        return Finding(
            WARNING,
            "unplannable",
            entry.schema,
            f"{who} has a migration history migrate would refuse or re-plan (a migration "
            "recorded before its dependencies, or a squashed migration partly applied). Run "
            f"migrate_schemas_safe --schema {entry.schema} --plan to see it.",
        )
    if entry.plan.empty and entry.unfinished:
        return Finding(
            WARNING,
            "incomplete",
            entry.schema,
            f"{who} has every migration recorded, but the run that migrated it did not finish "
            f"(its lock was left by {entry.unfinished}): its post_migrate handlers (content "
            "types, permissions) may not have run. Run migrate_schemas_safe to complete it.",
            {"lock": entry.unfinished},
        )
    if entry.current:
        return None
    missing = entry.missing_by_app()
    listed = "; ".join(f"{app}: {', '.join(names)}" for app, names in missing.items())
    return Finding(
        WARNING,
        "behind",
        entry.schema,
        f"{who} is behind on migrations ({listed}). Run migrate_schemas_safe.",
        {"missing": missing},
    )


def _drifted(alias: str, entries: list[plan.SchemaPlan], digests: dict[str, str]) -> list[Finding]:
    found = []
    for one in drift.find(alias, entries, digests):
        expected = (
            "what a new tenant gets (the provisioning recording)"
            if one.reference == drift.RECORDING
            else f"what {one.alike} of the {one.of} tenants at its migration state have"
        )
        found.append(
            Finding(
                WARNING,
                "catalog-drift",
                one.schema,
                f"Tenant {quoted(one.schema)} differs from {expected}: {one.describe()}. Undo "
                "the change, or make it a migration every tenant gets (see Catalog drift in "
                "tenantsafe's docs).",
                {
                    "reference": one.reference,
                    "alike": one.alike,
                    "of": one.of,
                    "differences": [asdict(d) for d in one.differences],
                },
            )
        )
    return found


def _duplicates(entry: plan.SchemaPlan) -> Finding:
    listed = ", ".join(f"{app}.{name}" for app, name in entry.duplicates)
    return Finding(
        ERROR,
        "duplicate-migrations",
        entry.schema,
        f"Tenant {quoted(entry.schema)} has migrations recorded more than once ({listed}): two "
        "runs applied them at the same time. Check its tables against a healthy tenant, then "
        "delete the extra django_migrations rows.",
        {"migrations": [f"{app}.{name}" for app, name in entry.duplicates]},
    )


def _expected_registry() -> tuple[list[str], list[str]]:
    """What Django's post_migrate handlers create: a content type per model, and each
    model's default and custom permissions ("app.model" and "app.model.codename")."""
    types: list[str] = []
    perms: list[str] = []
    for config in apps.get_app_configs():
        for model in config.get_models():
            opts = model._meta
            key = f"{opts.app_label}.{opts.model_name}"
            types.append(key)
            codenames = [f"{action}_{opts.model_name}" for action in opts.default_permissions]
            codenames += [codename for codename, _ in opts.permissions]
            perms += [f"{key}.{codename}" for codename in codenames]
    return types, perms


# Tables per statement of _registry_lag. Each is one scan, its rows compared here: joining
# and counting them in PostgreSQL cost it half as much again as a scan.
_REGISTRY_CHUNK = 200


def _registry_lag(
    alias: str, refs: list[TenantRef], namespaces: dict[str, set[str]]
) -> list[Finding]:
    """Those of ``refs`` that lack content types or permissions (post_migrate cut short, if
    they have every migration)."""
    if not refs or not apps.is_installed("django.contrib.contenttypes"):
        return []
    types, perms = _expected_registry()
    # Per tenant type (the router decides by it): once, not once per tenant.
    first = {ref.tenant_type: ref for ref in reversed(refs)}
    routed = {kind: plan.routed_apps(alias, ref.schema, kind) for kind, ref in first.items()}
    parts = []
    # Per tenant read: its content types by id, and its permissions (None: not read).
    found: dict[int, tuple[dict[int, str], list[tuple[int, str]] | None]] = {}
    for i, ref in enumerate(refs):
        tables = namespaces.get(ref.schema, set())
        if "django_content_type" not in tables or "contenttypes" not in routed[ref.tenant_type]:
            continue
        q = schemas.quote(ref.schema)
        parts.append(
            f"SELECT {i}, c.id, c.app_label || '.' || c.model, NULL "  # noqa: S608
            f"FROM {q}.django_content_type c"
        )
        found[i] = ({}, None)
        if "auth_permission" in tables and "auth" in routed[ref.tenant_type]:
            parts.append(
                f"SELECT {i}, p.content_type_id, NULL, p.codename FROM {q}.auth_permission p"  # noqa: S608
            )
            found[i] = ({}, [])
    with connections[alias].cursor() as cursor:
        for start in range(0, len(parts), _REGISTRY_CHUNK):
            cursor.execute(" UNION ALL ".join(parts[start : start + _REGISTRY_CHUNK]))
            for i, ident, key, codename in cursor.fetchall():
                kinds, codes = found[i]
                if codename is None:
                    kinds[ident] = key
                elif codes is not None:
                    codes.append((ident, codename))
    findings = []
    for i, (kinds, codes) in found.items():
        schema = refs[i].schema
        type_count = len(set(kinds.values()) & set(types))
        if type_count < len(types):
            findings.append(
                _lag(schema, "contenttypes-behind", "content types", type_count, len(types))
            )
        perm_count = len({f"{kinds.get(ct)}.{code}" for ct, code in codes or ()} & set(perms))
        if codes is not None and perm_count < len(perms):
            findings.append(
                _lag(schema, "permissions-behind", "permissions", perm_count, len(perms))
            )
    return findings


def _lag(schema: str, kind: str, what: str, found: int, expected: int) -> Finding:
    return Finding(
        WARNING,
        kind,
        schema,
        f"Tenant {quoted(schema)} has {found} of the {expected} {what} the installed apps "
        "define: the post_migrate handlers of its last migration did not finish. Run "
        f"migrate_schemas_safe --schema {schema} --no-skip to create them.",
        {"found": found, "expected": expected},
    )


def _tenant_tables_in_public(alias: str, public: str, rows: list[TenantRef]) -> list[Finding]:
    shared = plan.routed_apps(alias, public)
    # The router decides from the schema and the tenant type; any non-public name will do.
    probe = next((s for s, _ in rows if schemas.is_valid(s)), "tenantsafe_probe")
    types = [t for t in get_tenant_types() if t != public] if has_multi_type_tenants() else [""]
    tenant_only = set().union(*(plan.routed_apps(alias, probe, t) for t in types)) - shared
    expected = {
        model._meta.db_table: model._meta.app_label
        for model in apps.get_models(include_auto_created=True)
        if model._meta.app_label in tenant_only and model._meta.managed and not model._meta.proxy
    }
    leaked = sorted(set(expected) & schemas.public_tables(alias))
    if not leaked:
        return []
    return [
        Finding(
            ERROR,
            "tenant-tables-in-public",
            public,
            f"The public schema holds {len(leaked)} table(s) of tenant-only apps "
            f"({', '.join(leaked)}): a migration ran in public with a tenant's search_path, "
            "typically through a transaction pooler. Check them for tenant data, then drop "
            "them from public.",
            {"tables": leaked, "apps": sorted({expected[t] for t in leaked})},
        )
    ]


def _pooler(alias: str) -> dict[str, Any]:
    found = pooler.detect(connections[alias])
    return {
        "pooled": found.pooled,
        "source": found.source,
        "configured_port": found.configured_port,
        "server_port": found.server_port,
        "runtime_guard": conf.runtime_guard_enabled(),
        "description": f"Database {quoted(alias)} {found.describe(alias)}.",
    }
