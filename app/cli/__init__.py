"""The ``certautopilot`` command (``python -m app.cli`` runs it too): one module per
command group, listed in ``app.cli.main.COMMANDS``."""

from app.cli.main import cli, main

__all__ = ["cli", "main"]
