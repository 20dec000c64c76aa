"""ACME accounts of a project."""
