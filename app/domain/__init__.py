"""Domain objects and their state machines: projects, tokens, certificates (spec, issued
result, revocation), orders, accounts, challenge records, the issuance that drives an ACME
order and the renewal policy. Views and job handlers call these functions; they own the
documents."""
