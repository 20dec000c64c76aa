"""ACME orders (read only)."""
