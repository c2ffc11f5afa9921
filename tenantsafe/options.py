"""The options of a ``migrate_schemas_safe`` run, as one typed value (a leaf module)."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|min|m)?\s*$")
_UNIT_MS = {"ms": 1, "s": 1000, "min": 60_000, "m": 60_000, None: 1000}


def duration_ms(text: str | float | int) -> int:
    """``"5s"``, ``"500ms"``, ``"2min"`` or a number of seconds, in milliseconds."""
    if isinstance(text, (int, float)):
        return int(float(text) * 1000)
    match = _DURATION.match(text)
    if not match:
        raise ValueError(
            f"{text!r} is not a duration: write it as 500ms, 5s or 2min (0 turns it off)"
        )
    return int(float(match.group(1)) * _UNIT_MS[match.group(2)])


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
    # PostgreSQL's lock_timeout inside each migration transaction; 0 leaves it alone.
    lock_timeout_ms: int = 5000
    # How often an atomic migration that hit the lock timeout is tried again.
    lock_retries: int = 3
    # After this many failed tenants no new tenant starts; None: never stop.
    max_failures: int | None = None
    # Apply a plan by replay to tenants like two witnesses (tenantsafe.migrate.deploy).
    replay: bool = True
    # Forked workers of the multiprocessing executor; None: TENANT_MULTIPROCESSING_MAX_PROCESSES.
    processes: int | None = None

    @classmethod
    def from_command(
        cls,
        options: Mapping[str, Any],
        *,
        args: Sequence[Any] = (),
        executor: str = "standard",
        lock_timeout: str | float,
        lock_retries: int,
        replay: bool = True,
        subprocess_parallel: int = 1,
    ) -> RunOptions:
        # --run-syncdb and --prune make migrate write even with an empty plan.
        skip = not (options.get("no_skip") or options.get("run_syncdb") or options.get("prune"))
        processes = None
        if executor == "subprocess":
            # django-tenants' subprocess executor starts a Python per tenant, which would run
            # migrate unguarded and cold: its --parallel N becomes N forked workers of the
            # run's own, which share its warm state.
            executor = "multiprocessing"
            processes = int(options.get("parallel") or subprocess_parallel)
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
            lock_timeout_ms=duration_ms(
                options["lock_timeout"] if options.get("lock_timeout") is not None else lock_timeout
            ),
            lock_retries=int(
                options["lock_retries"] if options.get("lock_retries") is not None else lock_retries
            ),
            max_failures=1 if options.get("fail_fast") else options.get("max_failures"),
            replay=replay and not options.get("no_replay"),
            processes=processes,
        )
