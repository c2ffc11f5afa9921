"""The options of a ``migrate_schemas_safe`` run, as one typed value (a leaf module)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO


@dataclass(frozen=True)
class RunOptions:
    database: str
    # What Django's migrate command gets in each schema (its own options, unchanged).
    migrate: Mapping[str, Any] = field(repr=False)
    args: Sequence[Any] = ()
    executor: str = "standard"
    verbosity: int = 1
    create_missing: bool = False
    # Answer tenants with nothing to apply from one batched read instead of running migrate.
    skip_current: bool = True
    check: bool = False
    plan: bool = False
    app_label: str | None = None
    migration_name: str | None = None
    stdout: TextIO | None = None

    @classmethod
    def from_command(
        cls, options: Mapping[str, Any], *, args: Sequence[Any] = (), executor: str = "standard"
    ) -> RunOptions:
        # --run-syncdb and --prune make migrate write even with an empty plan.
        skip = not (options.get("no_skip") or options.get("run_syncdb") or options.get("prune"))
        return cls(
            database=options["database"],
            # This command ran the system checks once already (unless skipped); migrate
            # would run them again in every schema.
            migrate={**options, "skip_checks": True},
            args=tuple(args),
            executor=executor,
            verbosity=int(options.get("verbosity", 1)),
            create_missing=bool(options.get("create_missing")),
            skip_current=skip,
            check=bool(options.get("check_unapplied")),
            plan=bool(options.get("plan")),
            app_label=options.get("app_label"),
            migration_name=options.get("migration_name"),
            stdout=options.get("stdout"),
        )
