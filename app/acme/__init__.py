"""ACME: a client on top of certbot's ``acme`` package (``client``), problem types and
what to do about them (``errors``), names (``identifiers``), ARI (``ari``), challenge
solvers and the HTTP-01 responder (``solvers``, ``responder``), and the resumable order
engine (``issuance``) the ``certificates.issue`` job runs (``handlers``)."""
