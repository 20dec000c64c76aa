"""``python -m app.cli_entry`` runs the certautopilot command (for environments without
the console script on PATH)."""

from app.cli import main

if __name__ == "__main__":
    main()
