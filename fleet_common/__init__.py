"""Fleet's shared core: settings, storage, the task state machine, dispatch and tokens.

Nothing here imports Flask or Celery; the API and the workers both build on it.
"""
