"""The TLS-ALPN-01 responder (RFC 8737): a TLS listener that, for a connection offering
ALPN ``acme-tls/1`` with the SNI name of a pending challenge, presents a self-signed
certificate for that name carrying the critical ``id-pe-acmeIdentifier`` extension
(SHA-256 of the key authorization), then closes.

The key authorization is read through ``lookup(name)`` (the application's reads the
shared ``challenges`` collection), so whichever api replica the CA reaches answers.
Every api process listens on the same port with SO_REUSEPORT. An unknown name gets the
``unrecognized_name`` alert. (Python's ssl picks the certificate at SNI time, before
ALPN is negotiated: a client that does not offer ``acme-tls/1`` still sees the validation
certificate, which holds only a digest, and is then disconnected.)
"""

from __future__ import annotations

import datetime
import hashlib
import logging
import socket
import socketserver
import ssl
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

log = logging.getLogger(__name__)

ACME_TLS_1 = "acme-tls/1"
ID_PE_ACME_IDENTIFIER = x509.ObjectIdentifier("1.3.6.1.5.5.7.1.31")
HANDSHAKE_TIMEOUT = 10.0

Lookup = Callable[[str], "str | None"]


def challenge_certificate(name: str, key_authorization: str) -> tuple[bytes, bytes]:
    """(certificate PEM, key PEM) of the RFC 8737 validation certificate for ``name``."""
    key = ec.generate_private_key(ec.SECP256R1())
    digest = hashlib.sha256(key_authorization.encode()).digest()
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject).issuer_name(subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        # the extension's value is the DER OCTET STRING of the digest (RFC 8737 §3)
        .add_extension(x509.UnrecognizedExtension(ID_PE_ACME_IDENTIFIER,
                                                  b"\x04\x20" + digest), critical=True)
        .sign(key, hashes.SHA256())
    )
    return (cert.public_bytes(serialization.Encoding.PEM),
            key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption()))


def _context_for(name: str, key_authorization: str, workdir: Path) -> ssl.SSLContext:
    cert_pem, key_pem = challenge_certificate(name, key_authorization)
    # ssl loads a chain only from files: a private directory, removed right after
    with tempfile.TemporaryDirectory(dir=workdir) as directory:
        cert_path, key_path = Path(directory) / "c.pem", Path(directory) / "k.pem"
        cert_path.write_bytes(cert_pem)
        key_path.touch(mode=0o600)
        key_path.write_bytes(key_pem)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert_path, key_path)
    context.set_alpn_protocols([ACME_TLS_1])
    return context


class TlsAlpnResponder(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], lookup: Lookup) -> None:
        self.lookup = lookup
        self.workdir = Path(tempfile.mkdtemp(prefix="cap-tls-alpn-"))
        self.workdir.chmod(0o700)
        self.base = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.base.set_alpn_protocols([ACME_TLS_1])
        self.base.sni_callback = self._sni
        super().__init__(address, _Handler, bind_and_activate=False)
        if hasattr(socket, "SO_REUSEPORT"):
            # every api process (gunicorn worker) listens; the kernel spreads connections
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        try:
            self.server_bind()
            self.server_activate()
        except OSError:
            self.server_close()
            raise

    def _sni(self, sock: ssl.SSLObject | ssl.SSLSocket, name: str | None,
             _context: ssl.SSLContext) -> int | None:
        if not name:
            return ssl.ALERT_DESCRIPTION_UNRECOGNIZED_NAME
        name = name.lower().rstrip(".")
        try:
            key_authorization = self.lookup(name)
        except Exception as exc:  # noqa: BLE001 - the CA retries; say why here
            log.warning("tls-alpn-01 lookup failed", extra={"error": str(exc)[:200]})
            return ssl.ALERT_DESCRIPTION_INTERNAL_ERROR
        if key_authorization is None:
            return ssl.ALERT_DESCRIPTION_UNRECOGNIZED_NAME
        sock.context = _context_for(name, key_authorization, self.workdir)
        return None


class _Handler(socketserver.BaseRequestHandler):
    server: TlsAlpnResponder

    def handle(self) -> None:
        conn: socket.socket = self.request
        conn.settimeout(HANDSHAKE_TIMEOUT)
        try:
            with self.server.base.wrap_socket(conn, server_side=True) as tls:
                if tls.selected_alpn_protocol() != ACME_TLS_1:
                    return  # not a validation: nothing to say
        except (OSError, ssl.SSLError):
            return  # refused names, scanners, timeouts: nothing to do


def serve(host: str, port: int, lookup: Lookup) -> TlsAlpnResponder:
    """Start the responder on ``host:port`` in a daemon thread; ``shutdown()`` stops it."""
    server = TlsAlpnResponder((host, port), lookup)
    threading.Thread(target=server.serve_forever, name="tls-alpn-01", daemon=True).start()
    log.info("tls-alpn-01 responder listening", extra={"host": host, "port": port})
    return server
