"""API tokens: create (shown once), list, read, revoke."""
