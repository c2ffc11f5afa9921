"""What the doctor found: findings at three levels, the report, and its text form (a leaf
module: the modules that examine one thing return findings without importing the doctor)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

ERROR = "error"
WARNING = "warning"
INFO = "info"
LEVELS = (ERROR, WARNING, INFO)


@dataclass(frozen=True)
class Finding:
    level: str
    kind: str
    schema: str | None
    message: str
    details: dict[str, Any] = field(default_factory=dict)


@dataclass
class Report:
    database: str
    tenants: int = 0
    current: int = 0
    pooler: dict[str, Any] = field(default_factory=dict)
    # What the catalog caches cost a server connection (tenantsafe.memory).
    catalog_memory: dict[str, Any] = field(default_factory=dict)
    # On Citus: each worker's tenants, and each tenant's node (tenantsafe.sharding).
    citus: dict[str, Any] = field(default_factory=dict)
    findings: list[Finding] = field(default_factory=list)
    elapsed: float = 0.0

    def count(self, level: str) -> int:
        return sum(1 for f in self.findings if f.level == level)

    def fails(self, fail_on: str) -> bool:
        failing = {ERROR} if fail_on == ERROR else {ERROR, WARNING}
        return any(f.level in failing for f in self.findings)

    def as_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["counts"] = {level: self.count(level) for level in LEVELS}
        data["elapsed"] = round(self.elapsed, 3)
        return data


def quoted(name: str) -> str:
    # As a JSON string: names straight from tenant rows may hold quotes or control characters.
    return json.dumps(name, ensure_ascii=False)


def render(report: Report) -> list[str]:
    """The report as lines of an aligned table."""
    lines = [
        f"tenantsafe doctor: database {quoted(report.database)}, {report.tenants} tenant(s), "
        f"{report.current} current, read in {report.elapsed:.2f}s",
        "",
    ]
    rows = [("LEVEL", "SCHEMA", "FINDING")] + [
        (f.level.upper(), quoted(f.schema) if f.schema is not None else "-", f.message)
        for f in sorted(report.findings, key=lambda f: (LEVELS.index(f.level), f.kind))
    ]
    widths = [max(len(row[i]) for row in rows) for i in (0, 1)]
    for level, schema, message in rows:
        lines.append(f"{level:<{widths[0]}}  {schema:<{widths[1]}}  {message}")
    errors, warnings = report.count(ERROR), report.count(WARNING)
    lines.append("")
    if errors or warnings:
        lines.append(f"{errors} error(s), {warnings} warning(s).")
    else:
        lines.append("No problems found.")
    return lines
