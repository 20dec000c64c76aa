"""/metrics answers Prometheus text exposition, not JSON: no schema."""
