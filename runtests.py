"""Run the test suite (or the demo) against PostgreSQL.

    python runtests.py [pytest arguments]   # e.g. -n 2 -k guard
    python runtests.py --demo               # the main job: migrate_schemas_safe on demo tenants

Without DATABASE_URL a throwaway PostgreSQL cluster (and pgbouncer in transaction pooling, when
installed) is started for the run and removed afterwards; with it, that server is used.
"""

from __future__ import annotations

import os
import sys


def _run(argv: list[str]) -> int:
    if argv[:1] == ["--demo"]:
        from testproject.demo import main as demo

        return demo(argv[1:])
    import pytest

    if "--no-cov" not in argv:
        argv = ["--cov=tenantsafe", "--cov-report=term-missing:skip-covered", *argv]
    return int(pytest.main(argv))


def main(argv: list[str]) -> int:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "testproject.settings")
    if os.environ.get("DATABASE_URL"):
        return _run(argv)
    from testproject.cluster import ClusterUnavailable, throwaway_cluster

    try:
        with throwaway_cluster():
            return _run(argv)
    except ClusterUnavailable as exc:
        print(exc, file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
