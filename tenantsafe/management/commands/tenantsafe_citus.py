from __future__ import annotations

from argparse import ArgumentParser
from collections.abc import Iterable
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import DEFAULT_DB_ALIAS, DatabaseError, connections

from tenantsafe import schemas, sharding, tenants
from tenantsafe.errors import ShardingError


class Command(BaseCommand):
    help = (
        "On a Citus cluster: distribute tenants made before schema-based sharding was on, move "
        "a tenant to another node, or rebalance, each tenant under its lease (never while "
        "migrate_schemas_safe migrates it)."
    )

    def add_arguments(self, parser: ArgumentParser) -> None:
        from django_tenants.utils import get_tenant_database_alias

        parser.add_argument(
            "--database",
            default=get_tenant_database_alias() or DEFAULT_DB_ALIAS,
            choices=list(connections),
            help="The Citus coordinator's database (default: the tenant database).",
        )
        assert isinstance(parser, CommandParser)
        actions = parser.add_subparsers(dest="action", required=True, parser_class=CommandParser)
        distribute = actions.add_parser(
            "distribute", help="Distribute tenant schemas that live on the coordinator."
        )
        which = distribute.add_mutually_exclusive_group(required=True)
        which.add_argument("--schema", action="append", help="A tenant schema (repeatable).")
        which.add_argument("--all", action="store_true", help="Every undistributed tenant.")
        move = actions.add_parser("move", help="Move a tenant schema to another worker node.")
        move.add_argument("--schema", required=True)
        move.add_argument("--to", required=True, metavar="HOST:PORT", help="The worker node.")
        rebalance = actions.add_parser(
            "rebalance", help="Apply Citus's rebalance plan, one tenant at a time."
        )
        rebalance.add_argument(
            "--plan", action="store_true", help="Only show which tenants would move where."
        )
        for sub in (move, rebalance):
            sub.add_argument(
                "--mode",
                choices=sharding.TRANSFER_MODES,
                default="auto",
                help="Citus's shard_transfer_mode (default: auto, online where it can be).",
            )

    def handle(self, *args: Any, **options: Any) -> None:
        alias = options["database"]
        try:
            if sharding.layout(alias) is None:
                raise CommandError(
                    f"tenantsafe_citus: database {alias!r} is not a Citus database (the citus "
                    "extension is not installed in it)."
                )
            self._run(alias, options)
        except ShardingError as exc:
            raise CommandError(f"tenantsafe_citus: {exc}") from exc
        except DatabaseError as exc:
            raise CommandError(
                f"tenantsafe_citus {options['action']} failed on database {alias!r}: "
                f"{' '.join(str(exc).split())}"
            ) from exc

    def _run(self, alias: str, options: dict[str, Any]) -> None:
        action = options["action"]
        if action == "distribute":
            names = options["schema"] or _undistributed(alias)
            self._report(
                (sharding.distribute(alias, name, waiting=self._waiting) for name in names),
                "distributed",
            )
        elif action == "move":
            moved = sharding.move(
                alias, options["schema"], options["to"], options["mode"], waiting=self._waiting
            )
            self._report([moved], "moved")
        elif options["plan"]:
            for schema, target in sharding.rebalance_plan(alias):
                self.stdout.write(f"tenantsafe_citus: would move {schema} to {target}")
        else:
            self._report(sharding.rebalance(alias, options["mode"], waiting=self._waiting), "moved")

    def _waiting(self, schema: str, holder: str) -> None:
        self.stdout.write(f"tenantsafe_citus: waiting for {schema}'s lease, held by {holder}")
        # Seen now, not when the wait is over.
        self.stdout.flush()

    def _report(self, done: Iterable[sharding.Moved], verb: str) -> None:
        count = 0
        for moved in done:
            count += 1
            source = moved.source or "the coordinator"
            self.stdout.write(
                f"tenantsafe_citus: {moved.schema} {verb} from {source} to {moved.target} in "
                f"{moved.seconds:.1f}s"
            )
        self.stdout.write(f"tenantsafe_citus: {count} tenant(s) {verb}.")


def _undistributed(alias: str) -> list[str]:
    layout = sharding.layout(alias)
    assert layout is not None
    names = [ref.schema for ref in tenants.refs(alias)]
    present = schemas.existing(alias, names)
    return layout.undistributed([name for name in names if name in present])
