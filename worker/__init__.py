"""The normcore worker: Celery app and the task that runs training jobs."""
