"""The summary of a run: counts on stdout, failures grouped by error on stderr."""

from __future__ import annotations

import collections
import re

from django.core.management.base import OutputWrapper
from django.core.management.color import Style
from django_tenants.utils import get_public_schema_name

from tenantsafe.results import (
    CURRENT,
    FAILED,
    MIGRATED,
    NOT_ATTEMPTED,
    PENDING,
    PLANNED,
    REPLAYED,
    Summary,
    TenantResult,
)


def report(
    summary: Summary,
    *,
    stdout: OutputWrapper,
    stderr: OutputWrapper,
    style: Style,
    verbosity: int,
    show_traceback: bool,
) -> None:
    public = get_public_schema_name()
    tenant_results = [r for r in summary.results if r.schema != public]
    counts = collections.Counter(r.status for r in tenant_results)
    parts = [f"{counts[MIGRATED]} migrated"]
    if counts[REPLAYED]:
        parts.append(f"{counts[REPLAYED]} replayed")
    parts.append(f"{counts[CURRENT]} already current")
    if counts[PLANNED]:
        parts.append(f"{counts[PLANNED]} with a plan shown")
    if counts[PENDING]:
        parts.append(f"{counts[PENDING]} with unapplied migrations")
    parts.append(f"{counts[FAILED]} failed")
    if counts[NOT_ATTEMPTED]:
        parts.append(f"{counts[NOT_ATTEMPTED]} not attempted")
    if verbosity >= 1:
        shared = [f"public {r.status}; " for r in summary.results if r.schema == public]
        stdout.write(
            f"migrate_schemas_safe: {''.join(shared)}{len(tenant_results)} tenant(s): "
            + ", ".join(parts)
            + f" in {summary.elapsed:.1f}s"
        )
        if summary.stopped:
            stdout.write(
                f"migrate_schemas_safe: stopped early ({summary.stopped}): "
                f"{summary.count(NOT_ATTEMPTED)} tenant(s) not attempted."
            )
    for error, failed in _grouped(summary.failed).items():
        if show_traceback:
            for result in failed:
                if result.traceback:
                    stderr.write(result.traceback)
        if len(failed) == 1:
            stderr.write(style.ERROR(f"FAILED {failed[0].schema}: {failed[0].error}"))
            continue
        names = ", ".join(r.schema for r in failed[:3])
        more = f" and {len(failed) - 3} more" if len(failed) > 3 else ""
        stderr.write(style.ERROR(f"FAILED {len(failed)} tenants ({names}{more}): {error}"))
    for problem in summary.public_problems:
        stderr.write(style.ERROR(f"FAILED public: {problem}"))
    if verbosity >= 2:
        for result in summary.results:
            if result.status == PENDING:
                stdout.write(f"PENDING {result.schema}: {result.error}")


def _grouped(failed: list[TenantResult]) -> dict[str, list[TenantResult]]:
    """Failures by error, with each tenant's own schema name in it written as <schema>."""
    groups: dict[str, list[TenantResult]] = {}
    for result in failed:
        error = re.sub(rf"(?<![\w$]){re.escape(result.schema)}(?![\w$])", "<schema>", result.error)
        groups.setdefault(error, []).append(result)
    return groups
