"""Scheduler and worker status."""
