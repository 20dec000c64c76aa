"""Operations support: probes for the roles that serve no HTTP."""
