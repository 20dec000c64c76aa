"""Real servers for the drift and alert tests: TLS endpoints (plain TLS or after a
STARTTLS exchange) whose certificate can be switched, an HTTP webhook receiver that can
go down and come back on the same port, and an SMTP server (aiosmtpd) with STARTTLS and
AUTH. Plus a small certificate factory (a CA and its leaves)."""

from __future__ import annotations

import datetime
import hashlib
import json
import socket
import ssl
import struct
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

# ------------------------------------------------------------------ certificates


@dataclass
class Leaf:
    cert_path: Path
    key_path: Path
    pem: str
    fingerprint_sha256: str
    serial: str
    not_after: datetime.datetime
    issuer: str


class CertFactory:
    """A CA that signs leaves for names, written as files a TLS server can load."""

    def __init__(self, directory: Path, name: str = "Test CA") -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = datetime.datetime.now(datetime.UTC)
        self.cert = (x509.CertificateBuilder().subject_name(self.name).issuer_name(self.name)
                     .public_key(self.key.public_key()).serial_number(x509.random_serial_number())
                     .not_valid_before(now - datetime.timedelta(days=1))
                     .not_valid_after(now + datetime.timedelta(days=3650))
                     .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
                     .sign(self.key, hashes.SHA256()))
        self.count = 0

    def leaf(self, host: str = "localhost", days: float = 90,
             key_pem: bytes | None = None, names: list[str] | None = None) -> Leaf:
        """A leaf for ``host`` (its subject, and its SANs unless ``names`` lists them);
        its file holds the leaf then this CA."""
        self.count += 1
        key = serialization.load_pem_private_key(key_pem, None) if key_pem else \
            ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        cert = (x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)]))
                .issuer_name(self.name).public_key(key.public_key())  # type: ignore[arg-type]
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(hours=1))
                .not_valid_after(now + datetime.timedelta(days=days))
                .add_extension(x509.SubjectAlternativeName(
                    [x509.DNSName(n) for n in names or [host]]), False)
                .sign(self.key, hashes.SHA256()))
        cert_path = self.directory / f"leaf{self.count}.pem"
        key_path = self.directory / f"leaf{self.count}.key"
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM)
                              + self.cert.public_bytes(serialization.Encoding.PEM))
        key_path.write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption()))
        der = cert.public_bytes(serialization.Encoding.DER)
        return Leaf(cert_path, key_path, cert.public_bytes(serialization.Encoding.PEM).decode(),
                    hashlib.sha256(der).hexdigest(), format(cert.serial_number, "x"),
                    cert.not_valid_after_utc, cert.issuer.rfc4514_string())


def self_signed(directory: Path) -> tuple[Path, Path]:
    """A certificate for localhost / 127.0.0.1 that clients trust as its own CA."""
    from tests.helpers.pebble import write_tls_cert

    return write_tls_cert(directory)


# ------------------------------------------------------------------ TLS endpoints


class TlsEndpoint:
    """A TLS listener on 127.0.0.1 serving one certificate (switchable at any time),
    optionally after an SMTP, IMAP or PostgreSQL STARTTLS exchange."""

    def __init__(self, cert_path: Path, key_path: Path, starttls: str | None = None) -> None:
        self.starttls = starttls
        self._context = self._make_context(cert_path, key_path)
        self._sock = socket.create_server(("127.0.0.1", 0))
        self.port = self._sock.getsockname()[1]
        self._stop = threading.Event()
        self.handshakes = 0
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    @staticmethod
    def _make_context(cert_path: Path, key_path: Path) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(str(cert_path), str(key_path))
        return context

    def serve(self, cert_path: Path, key_path: Path) -> None:
        """From now on, serve this certificate (the 'reloaded load balancer')."""
        self._context = self._make_context(cert_path, key_path)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _serve(self) -> None:
        self._sock.settimeout(0.2)
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except (TimeoutError, OSError):
                continue
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        conn.settimeout(5)
        try:
            if self.starttls == "smtp":
                conn.sendall(b"220 test ESMTP\r\n")
                self._expect(conn, b"EHLO")
                conn.sendall(b"250-test\r\n250 STARTTLS\r\n")
                self._expect(conn, b"STARTTLS")
                conn.sendall(b"220 go ahead\r\n")
            elif self.starttls == "imap":
                conn.sendall(b"* OK IMAP4rev1 ready\r\n")
                tag = self._expect(conn, b"").split(b" ", 1)[0]
                conn.sendall(tag + b" OK begin TLS\r\n")
            elif self.starttls == "postgres":
                request = conn.recv(8)
                if struct.unpack("!ii", request) != (8, 80877103):
                    return
                conn.sendall(b"S")
            with self._context.wrap_socket(conn, server_side=True) as tls:
                self.handshakes += 1
                try:
                    tls.recv(1)
                except (OSError, ssl.SSLError):
                    pass
        except (OSError, ssl.SSLError, struct.error):
            pass
        finally:
            conn.close()

    @staticmethod
    def _expect(conn: socket.socket, prefix: bytes) -> bytes:
        line = b""
        while not line.endswith(b"\n"):
            chunk = conn.recv(1)
            if not chunk:
                raise OSError("closed")
            line += chunk
        if not line.upper().startswith(prefix):
            raise OSError(f"unexpected {line!r}")
        return line

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._sock.close()


def closed_port() -> int:
    """A port nothing listens on (bound, then released)."""
    with socket.create_server(("127.0.0.1", 0)) as sock:
        return int(sock.getsockname()[1])


# ------------------------------------------------------------------ HTTP receiver


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class HttpReceiver:
    """A webhook receiver on 127.0.0.1 that records every POST (2xx), and can go down
    (its port closed) and come back on the same port."""

    status: int = 200
    received: list[Received] = field(default_factory=list)
    port: int = 0
    tls: tuple[Path, Path] | None = None

    def __post_init__(self) -> None:
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self.up()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                status = receiver.status
                if 200 <= status < 300:
                    with receiver._lock:
                        receiver.received.append(Received(self.path, dict(self.headers),
                                                          body))
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        return Handler

    def up(self) -> None:
        server = ThreadingHTTPServer(("127.0.0.1", self.port), self._handler())
        server.daemon_threads = True
        if self.tls:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(str(self.tls[0]), str(self.tls[1]))
            server.socket = context.wrap_socket(server.socket, server_side=True)
        self.port = server.server_address[1]
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, kwargs={
            "poll_interval": 0.1}, daemon=True)
        self._thread.start()

    def down(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(5)

    def url(self, path: str = "/hook") -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}{path}"

    def bodies(self) -> list[Any]:
        with self._lock:
            return [r.json() for r in self.received]


# ------------------------------------------------------------------ SMTP server


class SmtpReceiver:
    """aiosmtpd on 127.0.0.1 with STARTTLS required (``implicit_tls``: TLS from the first
    byte instead) and AUTH checked against ``user``/``password``."""

    def __init__(self, cert_path: Path, key_path: Path, *, user: str = "alerts",
                 password: str = "s3cret-password", implicit_tls: bool = False) -> None:
        from aiosmtpd import smtp as aiosmtpd_smtp
        from aiosmtpd.controller import Controller
        from aiosmtpd.smtp import AuthResult, LoginPassword

        # aiosmtpd 1.4 sets its own deprecated Session.login_data after every successful
        # AUTH; the DeprecationWarning (an error under pytest) would fail the AUTH.
        aiosmtpd_smtp.Session.login_data = property(  # type: ignore[method-assign,assignment]
            lambda session: session._login_data,
            lambda session, value: setattr(session, "_login_data", value))

        self.messages: list[Any] = []
        self.auth_seen: list[str] = []
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(str(cert_path), str(key_path))
        receiver = self

        class Handler:
            async def handle_DATA(self, server: Any, session: Any,  # noqa: N802
                                  envelope: Any) -> str:
                from email import message_from_bytes

                receiver.messages.append(message_from_bytes(envelope.content))
                return "250 OK"

        def authenticator(server: Any, session: Any, envelope: Any, mechanism: str,
                          data: Any) -> AuthResult:
            ok = isinstance(data, LoginPassword) and data.login == user.encode() \
                and data.password == password.encode()
            receiver.auth_seen.append(mechanism)
            return AuthResult(success=ok, handled=False)

        self.port = closed_port()
        kwargs: dict[str, Any] = {"authenticator": authenticator, "auth_require_tls": True}
        if implicit_tls:
            # aiosmtpd only knows STARTTLS as "TLS"; here every byte is TLS already.
            kwargs.update(ssl_context=context, auth_require_tls=False)
        else:
            kwargs.update(tls_context=context, require_starttls=True)
        self.controller = Controller(Handler(), hostname="127.0.0.1", port=self.port,
                                     server_hostname="localhost", **kwargs)
        self.controller.start()

    def close(self) -> None:
        self.controller.stop()
