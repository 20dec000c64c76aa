"""ACME, the protocol side: a client on top of certbot's ``acme`` package (``client``),
problem types and what to do about them (``errors``), names (``identifiers``), ARI
(``ari``: the renewalInfo identifier and answer), challenge solvers (``solvers``) and the
HTTP-01 responder (``responder``). It talks to CAs and DNS servers and knows nothing of
the database: the issuance that drives it lives in ``app.domain.issuance``."""
