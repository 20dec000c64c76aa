"""Operations: watching what is served (drift scans) and telling people (alerts)."""
