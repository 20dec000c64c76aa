"""Audit sinks: deliver a batch of entries to a SIEM, or fail with ``SinkError``.

``send(entries)`` returns only once the batch is delivered as far as the protocol can
tell, so the forwarder may advance the sink's cursor; anything else raises ``SinkError``
(its message is safe to store and log: no token, no entry content).

- syslog (RFC 5424 messages, octet-counting framing of RFC 6587, over TCP or TLS): syslog
  has no application acknowledgement, so by default each batch goes over its own
  connection which is then half-closed; the batch counts as delivered when the receiver
  closes its side (it read up to our end of stream). A receiver that dies with unread
  data resets the connection instead, and the batch is sent again.
- HTTP: one POST per batch in the Splunk HEC shape (one JSON object per entry,
  ``{"time", "host", "source", "sourcetype", "event"}``, newline separated); any 2xx is
  delivery.
- file: JSON lines appended, flushed and fsynced.
"""

from __future__ import annotations

import json
import os
import re
import socket
import ssl
from typing import TYPE_CHECKING, Any, Protocol

from app.audit.log import _iso, _json_default
from app.config.audit_sinks import SinkSpec
from app.db import Doc

if TYPE_CHECKING:
    import requests


# SD-ID with the IANA example enterprise number (RFC 5612): CertAutoPilot has no PEN.
SD_ID = "certautopilot@32473"
SEVERITY_INFO = 6


class SinkError(Exception):
    """A batch was not (known to be) delivered; safe to show."""


class Sink(Protocol):
    spec: SinkSpec

    def send(self, entries: list[Doc]) -> None: ...

    def close(self) -> None: ...


def event(entry: Doc) -> Doc:
    """The forwarded form of an entry: every stored field but ``_id``, the time as
    ISO-8601 UTC. ``hash`` and ``prev_hash`` travel along, so the SIEM copy can be checked
    with the same chain rules (``canonical_json`` of it is the hashed form)."""
    body = {k: v for k, v in entry.items() if k != "_id"}
    body["time"] = _iso(body["time"]) if "time" in body else None
    return body


def event_json(entry: Doc) -> str:
    return json.dumps(event(entry), sort_keys=True, separators=(",", ":"),
                      ensure_ascii=False, default=_json_default)


def _error(prefix: str, exc: BaseException) -> SinkError:
    detail = str(exc) or exc.__class__.__name__
    return SinkError(f"{prefix}: {exc.__class__.__name__}: {detail}"[:300])


_SD_ESCAPE = re.compile(r'(["\\\]])')


def _sd_value(value: Any) -> str:
    return _SD_ESCAPE.sub(r"\\\1", str(value))


def _msgid(action: Any) -> str:
    cleaned = "".join(ch for ch in str(action) if "!" <= ch <= "~")
    return cleaned[:32] or "-"


class SyslogSink:
    """RFC 5424 over TCP or TLS with octet counting."""

    def __init__(self, spec: SinkSpec) -> None:
        self.spec = spec
        self.hostname = (socket.gethostname() or "-")[:255]
        self._tls: ssl.SSLContext | None = None
        if spec.kind == "syslog+tls":
            context = ssl.create_default_context(cafile=spec.ca)
            if spec.cert:
                context.load_cert_chain(spec.cert, spec.key)
            self._tls = context

    def frame(self, entry: Doc) -> bytes:
        pri = self.spec.facility * 8 + SEVERITY_INFO
        timestamp = _iso(entry["time"]) if entry.get("time") else "-"
        sd = (f'[{SD_ID} seq="{_sd_value(entry.get("seq"))}" '
              f'hash="{_sd_value(entry.get("hash"))}"]')
        line = (f"<{pri}>1 {timestamp} {self.hostname} {self.spec.app_name} - "
                f"{_msgid(entry.get('action'))} {sd} {event_json(entry)}").encode()
        return str(len(line)).encode() + b" " + line

    def send(self, entries: list[Doc]) -> None:
        payload = b"".join(self.frame(e) for e in entries)
        spec = self.spec
        assert spec.host is not None and spec.port is not None
        try:
            raw = socket.create_connection((spec.host, spec.port), timeout=spec.timeout)
        except OSError as exc:
            raise _error(f"connect to {spec.host}:{spec.port}", exc) from None
        sock: socket.socket = raw
        try:
            if self._tls is not None:
                try:
                    sock = self._tls.wrap_socket(raw, server_hostname=spec.server_name
                                                 or spec.host)
                except (OSError, ssl.SSLError) as exc:
                    raise _error("TLS handshake", exc) from None
            try:
                sock.sendall(payload)
            except OSError as exc:
                raise _error("send", exc) from None
            if spec.ack == "close":
                self._await_close(sock)
        finally:
            sock.close()

    def _await_close(self, sock: socket.socket) -> None:
        """Half-close, then wait for the receiver to close: it has read every byte."""
        try:
            if isinstance(sock, ssl.SSLSocket):
                try:
                    sock.unwrap()  # close_notify; returns once the peer answers with its own
                    return
                except (ssl.SSLEOFError, ssl.SSLZeroReturnError):
                    return  # the receiver closed after reading our close_notify
            sock.shutdown(socket.SHUT_WR)
            while True:
                if not sock.recv(65536):
                    return
        except TimeoutError:
            raise SinkError(f"no acknowledgement: the receiver did not close the connection "
                            f"within {self.spec.timeout:g}s (ack=none skips this wait)") \
                from None
        except OSError as exc:
            raise _error("receiver did not read the batch", exc) from None

    def close(self) -> None:
        return None


class HttpSink:
    """Batch POST in the Splunk HEC shape."""

    def __init__(self, spec: SinkSpec) -> None:
        self.spec = spec
        import requests  # here: only processes that forward pay for importing it

        self.hostname = socket.gethostname()
        self._session: requests.Session = requests.Session()

    def body(self, entries: list[Doc]) -> bytes:
        lines = []
        for entry in entries:
            wrapper: Doc = {"time": round(entry["time"].timestamp(), 3)
                            if entry.get("time") else None,
                            "host": self.hostname, "source": self.spec.source,
                            "sourcetype": self.spec.sourcetype, "event": event(entry)}
            if self.spec.index:
                wrapper["index"] = self.spec.index
            lines.append(json.dumps(wrapper, sort_keys=True, separators=(",", ":"),
                                    ensure_ascii=False, default=_json_default))
        return "\n".join(lines).encode()

    def send(self, entries: list[Doc]) -> None:
        spec = self.spec
        assert spec.url is not None
        headers = {"Content-Type": "application/json"}
        if spec.token_env:
            token = os.environ.get(spec.token_env)
            if not token:
                raise SinkError(f"the environment variable {spec.token_env} (token_env) is "
                                "not set")
            headers["Authorization"] = f"{spec.auth_scheme} {token}"
        import requests

        try:
            response = self._session.post(spec.url, data=self.body(entries), headers=headers,
                                          timeout=spec.timeout, verify=spec.ca or True)
        except requests.RequestException as exc:
            raise _error(f"POST {spec.display}", exc) from None
        with response:
            if not 200 <= response.status_code < 300:
                snippet = re.sub(r"\s+", " ", response.text[:160])
                raise SinkError(f"POST {spec.display}: HTTP {response.status_code} {snippet}")

    def close(self) -> None:
        self._session.close()


class FileSink:
    """JSON lines appended to a file, fsynced per batch."""

    def __init__(self, spec: SinkSpec) -> None:
        self.spec = spec

    def send(self, entries: list[Doc]) -> None:
        assert self.spec.path is not None
        data = "".join(event_json(e) + "\n" for e in entries).encode()
        try:
            with open(self.spec.path, "ab") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
        except OSError as exc:
            raise _error(f"append to {self.spec.path}", exc) from None

    def close(self) -> None:
        return None


def open_sink(spec: SinkSpec) -> Sink:
    if spec.kind.startswith("syslog"):
        return SyslogSink(spec)
    if spec.kind == "http":
        return HttpSink(spec)
    if spec.kind == "file":
        return FileSink(spec)
    raise ValueError(f"unknown sink kind {spec.kind!r}")
