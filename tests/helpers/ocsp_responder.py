"""A real OCSP responder for Pebble, which has none: it answers from Pebble's management
API (``/cert-status-by-serial/<serial>``) and signs with Pebble's intermediate key
(``/intermediate-keys/0``), so the service's OCSP check runs unchanged against it."""

from __future__ import annotations

import json
import ssl
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509 import ocsp

from devstack.embedded import free_port
from devstack.pebble import Pebble


def _get(pebble: Pebble, path: str) -> bytes:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # Pebble's management listener: a test CA
    with urllib.request.urlopen(f"{pebble.management_url}{path}", context=context,
                                timeout=5) as answer:
        return bytes(answer.read())


def pebble_status(pebble: Pebble, serial: int) -> tuple[str, datetime | None]:
    try:
        body = json.loads(_get(pebble, f"/cert-status-by-serial/{serial:x}"))
    except urllib.error.HTTPError:
        return "unknown", None
    status = str(body.get("Status", "")).lower()
    if status.startswith("revoked"):
        when = body.get("RevokedAt") or body.get("RevocationTime")
        # Go's time.String(): "2026-12-01 16:12:47.264643517 +0000 UTC"
        revoked_at = datetime.strptime(when[:19], "%Y-%m-%d %H:%M:%S").replace(
            tzinfo=UTC) if isinstance(when, str) else datetime.now(UTC) - timedelta(seconds=1)
        return "revoked", revoked_at
    return ("good", None) if status.startswith("valid") else ("unknown", None)


@contextmanager
def ocsp_responder(port: int | None = None) -> Iterator[tuple[str, dict[str, Pebble]]]:
    """Serve on ``port``; yields (URL, holder): set holder["pebble"] once Pebble runs
    (Pebble needs the URL in its config before it starts)."""
    port = port or free_port()
    holder: dict[str, Pebble] = {}

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - http.server's naming
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            pebble = holder["pebble"]
            request = ocsp.load_der_ocsp_request(body)
            issuer = x509.load_pem_x509_certificate(_get(pebble, "/intermediates/0"))
            key = serialization.load_pem_private_key(_get(pebble, "/intermediate-keys/0"),
                                                     None)
            status, revoked_at = pebble_status(pebble, request.serial_number)
            now = datetime.now(UTC).replace(microsecond=0)
            cert_status = {"good": ocsp.OCSPCertStatus.GOOD,
                           "revoked": ocsp.OCSPCertStatus.REVOKED}.get(
                status, ocsp.OCSPCertStatus.UNKNOWN)
            builder = ocsp.OCSPResponseBuilder().add_response_by_hash(
                request.issuer_name_hash, request.issuer_key_hash, request.serial_number,
                request.hash_algorithm, cert_status, now, now + timedelta(hours=1),
                revoked_at if status == "revoked" else None, None
            ).responder_id(ocsp.OCSPResponderEncoding.HASH, issuer)
            response = builder.sign(key, hashes.SHA256())  # type: ignore[arg-type]
            der = response.public_bytes(serialization.Encoding.DER)
            self.send_response(200)
            self.send_header("Content-Type", "application/ocsp-response")
            self.send_header("Content-Length", str(len(der)))
            self.end_headers()
            self.wfile.write(der)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{port}/", holder
    finally:
        server.shutdown()
        server.server_close()
