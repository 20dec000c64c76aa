"""Operations: what an operator runs or reads around the service (health before sleeping,
backup/restore/DR, probes, alerts), on top of domain, jobs, keys and audit."""
