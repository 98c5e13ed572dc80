"""``gunicorn fleet_api.wsgi:app``: the API built from the environment's settings."""

from fleet_api.app import create_app

app = create_app()
