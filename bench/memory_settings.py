"""The test project's settings for ``bench/bench_catalog_memory.py``: its request reads every
tenant app's tables (``bench.memory_urls``), and three variables set what is measured:

- ``BENCH_CONN_MAX_AGE``: Django's ``CONN_MAX_AGE`` (``none`` for persistent connections);
- ``BENCH_GUARD=1``: ``TENANTSAFE_RUNTIME_GUARD = True``;
- ``BENCH_RECYCLE_AFTER_SCHEMAS``: ``TENANTSAFE_RECYCLE_AFTER_SCHEMAS``.
"""

from __future__ import annotations

import os

from testproject.settings import *  # noqa: F403
from testproject.settings import DATABASES

ROOT_URLCONF = "bench.memory_urls"

_age = os.environ.get("BENCH_CONN_MAX_AGE", "0")
DATABASES["default"]["CONN_MAX_AGE"] = None if _age == "none" else int(_age)
TENANTSAFE_RUNTIME_GUARD = os.environ.get("BENCH_GUARD") == "1"
if os.environ.get("BENCH_RECYCLE_AFTER_SCHEMAS"):
    TENANTSAFE_RECYCLE_AFTER_SCHEMAS = int(os.environ["BENCH_RECYCLE_AFTER_SCHEMAS"])
