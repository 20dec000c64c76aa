"""Operations: fleet metrics (and, as they arrive, health checks, backup, alerts)."""
