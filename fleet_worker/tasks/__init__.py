"""Celery tasks, one module per domain; each module's ``register(app)`` adds its tasks to an app."""
