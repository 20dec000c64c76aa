"""Prometheus exposition at /metrics."""
