"""tenantsafe: django-tenants made safe behind any pooler and fast at any number of tenants.

The public API, covered by the changelog's deprecation rules:

- :mod:`tenantsafe.testing` (``create_tenant``, ``TenantTestCase``...), the pytest plugin
  (``tenantsafe.plugin``, loaded by its entry point) and its fixtures;
- :mod:`tenantsafe.provisioning` (``provision``, ``ensure_recording``, ``fill_spares``...);
- :mod:`tenantsafe.errors`, the exceptions tenantsafe raises;
- :func:`tenantsafe.recycling.recycle_if_due`, for loops outside requests (docs/catalog-memory.md);
- the ``TENANTSAFE_*`` settings (docs/settings.md), the management commands and their options,
  and the system checks' ids.

Every other module and package (``tenantsafe.guard``, ``tenantsafe.migrate``,
``tenantsafe.recording``, ``tenantsafe.plan``...) is internal: it may change in any release
without notice. See docs/api.rst.
"""

from __future__ import annotations

__version__ = "0.1.0"
