"""The audit log: query by time, actor, action, target."""
