"""Pebble for the tests: the launcher lives in devstack (``certautopilot dev`` starts it
too); the tests use it from here."""

from devstack.pebble import Pebble, start_pebble, write_tls_cert

__all__ = ["Pebble", "start_pebble", "write_tls_cert"]
