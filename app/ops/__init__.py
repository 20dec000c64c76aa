"""Operations: backup, restore and the DR test (``certautopilot backup | restore |
dr-test``). See docs/operations.md for the runbook."""
