"""Run the test suite (or the demo) against PostgreSQL.

    python runtests.py [pytest arguments]   # e.g. -n 2 -k guard
    python runtests.py --demo               # the main job: migrate_schemas_safe on demo tenants

Without DATABASE_URL a throwaway PostgreSQL cluster (and pgbouncer in transaction pooling, when
installed) is started for the run and removed afterwards; with it, that server is used. Unless
the arguments name tests, the database-free unit layer (tests/unit) runs first, in a process of
its own without any server, and a failure there ends the run.
"""

from __future__ import annotations

import os
import subprocess
import sys

UNIT = "tests/unit"


def _run(argv: list[str]) -> int:
    if argv[:1] == ["--demo"]:
        from testproject.demo import main as demo

        return demo(argv[1:])
    import pytest

    if "--no-cov" not in argv:
        argv = ["--cov=tenantsafe", "--cov-report=term-missing:skip-covered", *argv]
    return int(pytest.main(argv))


def _unit_first(argv: list[str]) -> tuple[int, list[str]]:
    """Run tests/unit alone, with no server to reach; (its exit status, the arguments for the
    rest). Skipped (status 0, ``argv`` unchanged) when ``argv`` names tests or is ``--demo``."""
    if argv[:1] == ["--demo"] or any(
        not arg.startswith("-") and os.path.exists(arg.split("::")[0]) for arg in argv
    ):
        return 0, argv
    cov = [] if "--no-cov" in argv else ["--cov=tenantsafe", "--cov-report="]
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "PGBOUNCER_URL")}
    status = subprocess.call([sys.executable, "-m", "pytest", *cov, *argv, UNIT], env=env)
    rest = [*argv, f"--ignore={UNIT}", *([] if "--no-cov" in argv else ["--cov-append"])]
    # 5: no test selected there (a -k for other tests).
    return (0 if status == 5 else status), rest


def main(argv: list[str]) -> int:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "testproject.settings")
    status, argv = _unit_first(argv)
    if status:
        return status
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
