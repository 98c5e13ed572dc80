"""Fleet worker: Celery tasks, executors (local, SSH) and the HTTP pull agent daemon."""
