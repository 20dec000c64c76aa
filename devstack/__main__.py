"""``python -m devstack`` (what ``scripts/run`` runs): the whole stack, supervised, via the
``certautopilot`` command so settings and errors behave the same."""

import sys

from app.cli.main import main

sys.argv = [sys.argv[0], "dev", *sys.argv[1:]]
main()
