"""``python -m app.cli`` runs the certautopilot command (for environments without the
console script on PATH)."""

from app.cli.main import main

main()
