"""The test project's manage.py: ``python -m testproject.manage <command>`` from the repo root.

With no DATABASE_URL it runs the command against a throwaway PostgreSQL cluster (plus pgbouncer
when installed) that it starts and removes again.
"""

from __future__ import annotations

import os
import sys


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "testproject.settings")
    from django.core.management import execute_from_command_line

    argv = list(sys.argv if argv is None else argv)
    if os.environ.get("DATABASE_URL"):
        execute_from_command_line(argv)
        return 0
    from testproject.cluster import ClusterUnavailable, throwaway_cluster

    try:
        with throwaway_cluster():
            execute_from_command_line(argv)
    except ClusterUnavailable as exc:
        print(exc, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
