"""Durable jobs: list, read, retry a dead one, cancel a queued one."""
