"""Managed certificates: CRUD, issue/renew now, revoke, PEM downloads, key export."""
