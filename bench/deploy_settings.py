"""The test project's settings for ``bench/bench_deploy.py``, which sets two variables:

- ``BENCH_DEPLOY_BIGAPP=1`` adds the generated large tenant app (``bench/_bigapp.py``, on
  PYTHONPATH) to ``TENANT_APPS``, as ``bench.bigapp_settings`` does;
- ``BENCH_DEPLOY_MIGRATION_MODULES`` (``label=module,...``) becomes ``MIGRATION_MODULES``: the
  benchmark points an app at a temporary copy of its migrations plus one new migration, so the
  deploy exists only for the processes that have it set.
"""

from __future__ import annotations

import os

from bench._bigapp import APP
from testproject.settings import *  # noqa: F403
from testproject.settings import INSTALLED_APPS, TENANT_APPS

if os.environ.get("BENCH_DEPLOY_BIGAPP") == "1":
    TENANT_APPS = [*TENANT_APPS, APP]
    INSTALLED_APPS = [*INSTALLED_APPS, APP]

MIGRATION_MODULES = dict(
    item.split("=", 1)
    for item in os.environ.get("BENCH_DEPLOY_MIGRATION_MODULES", "").split(",")
    if item
)
