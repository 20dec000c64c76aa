"""Mongo-lease Celery beat scheduler (see scheduler/schedulers.py)."""
