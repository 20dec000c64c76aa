"""A fleet of certificate documents, bulk-inserted in the shape issuance stores them
(the fields lists, the renewal scan and the metrics read), for scale-related tests."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from app import db as dbm

STATUSES = ("issued", "issued", "issued", "pending", "failed", "revoked")


def seed_fleet(db: Any, count: int, projects: list[str], now: datetime, *,
               due_every: int = 10, deleted_every: int = 17) -> list[dict[str, Any]]:
    """``count`` certificates over ``projects``: statuses cycling through STATUSES, notAfter
    from 2 days ago to 88 days ahead, every ``due_every``-th due now, every
    ``deleted_every``-th soft-deleted. Returns the documents inserted."""
    docs = []
    for i in range(count):
        status = STATUSES[i % len(STATUSES)]
        issued = status in ("issued", "revoked")
        not_after = now + timedelta(days=(i * 7) % 90 - 2, hours=i % 5) if issued else None
        deleted = bool(deleted_every) and i % deleted_every == 5
        name = f"c{i}.fleet.test"
        docs.append({
            "_id": f"crt_{i:016x}", "project_id": projects[i % len(projects)], "name": name,
            "names": [name], "identifiers": [{"type": "dns", "value": name}],
            "key_type": "ec256", "challenge": {"type": "http-01"}, "account_id": "acc_x",
            "directory_url": "https://ca.test/dir", "profile": None,
            "renewal": {"renew_before_days": None, "use_ari": True, "reuse_key": False},
            "status": "deleted" if deleted else status, "version": 3,
            "created_at": now - timedelta(days=30) + timedelta(seconds=i),
            "updated_at": now, "deleted_at": now if deleted else None,
            "next_renewal_at": None if deleted else (
                now - timedelta(minutes=1) if i % due_every == 0
                else now + timedelta(days=1 + i % 40)),
            "renewal_source": "lifetime", "serial": f"{i:x}" if issued else None,
            "not_before": not_after - timedelta(days=90) if not_after else None,
            "not_after": not_after, "fingerprint_sha256": None, "issuer": None,
            "key_id": None, "certificate_pem": "-----BEGIN CERTIFICATE-----\n" if issued
            else None, "chain_pem": None, "fullchain_pem": None, "order_id": None,
            "issued_at": None, "ari_cert_id": None, "ari": None, "failure": None,
            "issue_count": 1 if issued else 0,
        })
    db[dbm.CERTIFICATES].insert_many(docs)
    return docs
