"""The test project's settings plus the generated large tenant app (``bench/_bigapp.py``).

The app's package is generated at run time into a temporary directory, which the benchmark puts
on PYTHONPATH of the processes that use these settings.
"""

from __future__ import annotations

from bench._bigapp import APP
from testproject.settings import *  # noqa: F403
from testproject.settings import INSTALLED_APPS, TENANT_APPS

TENANT_APPS = [*TENANT_APPS, APP]
INSTALLED_APPS = [*INSTALLED_APPS, APP]
