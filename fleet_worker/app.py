"""The app for Celery's own command line: ``celery -A fleet_worker.app inspect ping``.

Importing this module does nothing; the app is built from the environment's settings
(``FLEET_CONFIG``, ``FLEET_*``) the first time ``fleet_worker.app.app`` is read.
"""

from __future__ import annotations

import functools
from typing import Any

from fleet_worker.celery_app import FleetCelery


@functools.cache
def _app() -> FleetCelery:
    from fleet_common.settings import load_settings
    from fleet_worker.celery_app import make_celery

    return make_celery(load_settings())


def __getattr__(name: str) -> Any:
    if name in ("app", "celery"):
        return _app()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
