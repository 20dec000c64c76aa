"""Forwarding the audit log: file, syslog over TCP and TLS (a real receiver here), HTTP
in the Splunk HEC shape; cursors in MongoDB, at least once and in order, a stopped
receiver catches up, and a failing sink shows in readiness and metrics only."""

from __future__ import annotations

import json
import socket
import ssl
import threading
import time
import traceback
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from app import db as dbm
from app.audit import forward, status
from app.audit.forward import SINKS, forward_all
from app.config.audit_sinks import parse_sinks
from app.health import readiness
from devstack.embedded import free_port
from tests.helpers import wait_for
from tests.helpers.pebble import write_tls_cert
from tests.integration.test_audit_chain import mutate


def sinks(value: str, **env: str) -> Any:
    return parse_sinks({"CAP_AUDIT_SINKS": value, **env})


class SyslogReceiver:
    """A TCP (or TLS) syslog receiver: octet-counted RFC 5424 frames, each connection read
    to its end and then closed, like rsyslog's imtcp. ``stop()`` drops the listener and
    every open connection (unread data is lost, as when a receiver dies)."""

    def __init__(self, port: int, tls: ssl.SSLContext | None = None) -> None:
        self.port, self.tls = port, tls
        self.messages: list[str] = []
        self.lock = threading.Lock()
        self.listener: socket.socket | None = None
        self.conns: list[socket.socket] = []
        self.threads: list[threading.Thread] = []

    def start(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(16)
        self.listener = listener
        thread = threading.Thread(target=self._accept, args=(listener,), daemon=True)
        thread.start()
        self.threads.append(thread)

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            with self.lock:
                self.conns.append(conn)
            thread = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            thread.start()
            self.threads.append(thread)

    def _serve(self, conn: socket.socket) -> None:
        stream: Any = conn
        buffer = b""
        try:
            if self.tls is not None:
                stream = self.tls.wrap_socket(conn, server_side=True)
            while True:
                try:
                    data = stream.recv(65536)
                except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                    data = b""
                if not data:
                    break
                buffer += data
                while b" " in buffer:
                    length, _, rest = buffer.partition(b" ")
                    if len(rest) < int(length):
                        break
                    with self.lock:
                        self.messages.append(rest[: int(length)].decode())
                    buffer = rest[int(length):]
            if self.tls is not None:
                try:
                    stream = stream.unwrap()
                except (OSError, ssl.SSLError):
                    pass
        except OSError:
            pass
        finally:
            stream.close()
            conn.close()

    def stop(self) -> None:
        if self.listener is not None:
            self.listener.close()
            self.listener = None
        with self.lock:
            conns, self.conns = self.conns, []
        for conn in conns:
            try:
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00"
                                b"\x00\x00\x00\x00")  # close with RST, data unread
                conn.close()
            except OSError:
                pass
        for thread in self.threads:
            thread.join(5)
        self.threads = []

    def seqs(self) -> list[int]:
        with self.lock:
            return [json.loads(m.split("] ", 1)[1])["seq"] for m in self.messages]


@pytest.fixture
def receiver() -> Iterator[SyslogReceiver]:
    rx = SyslogReceiver(free_port())
    rx.start()
    yield rx
    rx.stop()


def in_order_and_complete(received: list[int], last: int) -> None:
    """Every seq 1..last arrived, and each first arrived after every smaller one (resends
    after a failure may repeat a batch: at least once)."""
    first_seen: list[int] = []
    for seq in received:
        if seq not in first_seen:
            first_seen.append(seq)
    assert first_seen == list(range(1, last + 1))


def test_file_sink_gets_every_entry_once_and_in_order(migrated_db: Any, tmp_path: Path) -> None:
    db = migrated_db
    out = tmp_path / "audit.jsonl"
    config = sinks(f"file://{out}?batch=4")
    mutate(db, 10)
    result = forward_all(db, config)
    assert result[f"file:{out}"]["delivered"] == 10
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [e["seq"] for e in lines] == list(range(1, 11))
    stored = db[dbm.AUDIT].find_one({"seq": 3})
    assert lines[2]["hash"] == stored["hash"] and lines[2]["action"] == "thing.create"
    assert lines[2]["time"] == stored["time"].isoformat(timespec="milliseconds")
    assert db[SINKS].find_one({"_id": f"file:{out}"})["cursor"] == 10

    assert forward_all(db, config)[f"file:{out}"]["delivered"] == 0
    mutate(db, 3, start=10)
    forward_all(db, config)
    assert [json.loads(x)["seq"] for x in out.read_text().splitlines()] == list(range(1, 14))


def test_the_file_copy_carries_a_verifiable_chain(migrated_db: Any, tmp_path: Path) -> None:
    """What the SIEM holds can be checked with the same rules as the database."""
    from app.audit.log import GENESIS_HASH, entry_hash

    db = migrated_db
    out = tmp_path / "audit.jsonl"
    mutate(db, 5)
    forward_all(db, sinks(f"file://{out}"))
    prev = GENESIS_HASH
    for line in out.read_text().splitlines():
        entry = json.loads(line)
        assert entry["prev_hash"] == prev
        assert entry_hash(prev, entry) == entry["hash"]
        prev = entry["hash"]


def test_syslog_tcp_frames_are_rfc5424_octet_counted(migrated_db: Any,
                                                     receiver: SyslogReceiver) -> None:
    db = migrated_db
    mutate(db, 5)
    result = forward_all(db, sinks(f"syslog+tcp://127.0.0.1:{receiver.port}?batch=2"))
    assert list(result.values())[0]["delivered"] == 5
    assert receiver.seqs() == [1, 2, 3, 4, 5]
    message = receiver.messages[0]
    header, sd_and_msg = message.split(" [", 1)
    pri_version, timestamp, host, app_name, procid, msgid = header.split(" ")
    assert pri_version == "<110>1"  # facility 13 (log audit), severity 6 (info)
    assert timestamp.endswith("+00:00") and app_name == "certautopilot" and procid == "-"
    assert msgid == "thing.create"
    assert sd_and_msg.startswith('certautopilot@32473 seq="1" hash="')


def test_syslog_receiver_stopped_for_30s_mid_stream_gets_everything_in_order(
        migrated_db: Any, receiver: SyslogReceiver) -> None:
    db = migrated_db
    config = sinks(f"syslog+tcp://127.0.0.1:{receiver.port}?batch=20&timeout=2")
    done = threading.Event()
    written: list[int] = []

    errors: list[str] = []

    def writer() -> None:
        i = 0
        while not done.is_set():
            written.extend(mutate(db, 1, start=i))
            i += 1
            time.sleep(0.05)

    def forwarder() -> None:
        while not done.is_set():
            forward_all(db, config, owner="test-forwarder")
            time.sleep(0.5)

    def guarded(fn: Any) -> Any:
        def run() -> None:
            try:
                fn()
            except Exception:  # noqa: BLE001 - reported by the test below
                errors.append(traceback.format_exc())
                done.set()
        return run

    threads = [threading.Thread(target=guarded(writer)),
               threading.Thread(target=guarded(forwarder))]
    for thread in threads:
        thread.start()
    try:
        wait_for(lambda: len(receiver.seqs()) >= 20, timeout=30, message="first entries")
        receiver.stop()
        stopped_at = len(written)
        time.sleep(30)
        assert len(written) > stopped_at + 20  # mutations went on while it was down
        state = db[SINKS].find_one({"_id": config[0].name})
        assert state["consecutive_failures"] >= 1 and state["last_error"]
        receiver.start()
        time.sleep(2)
    finally:
        done.set()
        for thread in threads:
            thread.join(60)
    assert not errors, errors[0]
    last = max(written)
    while forward_all(db, config)[config[0].name].get("skipped") == "backoff":
        time.sleep(1)
    wait_for(lambda: receiver.seqs() and max(receiver.seqs()) == last, timeout=90,
             message="the receiver to catch up", interval=0.5)
    in_order_and_complete(receiver.seqs(), last)
    state = db[SINKS].find_one({"_id": config[0].name})
    assert state["cursor"] == last and state["consecutive_failures"] == 0


def test_syslog_over_tls(migrated_db: Any, tmp_path: Path) -> None:
    cert, key = write_tls_cert(tmp_path)
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(cert, key)
    rx = SyslogReceiver(free_port(), tls=server)
    rx.start()
    try:
        db = migrated_db
        mutate(db, 4)
        config = sinks(f"syslog+tls://localhost:{rx.port}?ca={cert}&batch=3")
        result = forward_all(db, config)
        assert list(result.values())[0] == {"delivered": 4, "cursor": 4}
        assert rx.seqs() == [1, 2, 3, 4]
        # A receiver the CA does not vouch for is a failure, not a delivery.
        (tmp_path / "other").mkdir()
        other, _ = write_tls_cert(tmp_path / "other")
        bad = sinks(f"syslog+tls://localhost:{rx.port}?ca={other}&name=untrusted")
        outcome = forward_all(db, bad)["untrusted"]
        assert outcome["delivered"] == 0 and "certificate verify failed" in outcome["error"]
    finally:
        rx.stop()


class Hec(BaseHTTPRequestHandler):
    batches: list[list[dict[str, Any]]] = []
    auth: list[str | None] = []
    status = 200

    def do_POST(self) -> None:  # noqa: N802 - http.server's naming
        body = self.rfile.read(int(self.headers["Content-Length"])).decode()
        type(self).auth.append(self.headers.get("Authorization"))
        if type(self).status == 200:
            type(self).batches.append([json.loads(line) for line in body.splitlines()])
        payload = b'{"text":"Success","code":0}' if type(self).status == 200 \
            else b'{"text":"Server is busy","code":9}'
        self.send_response(type(self).status)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def hec() -> Iterator[tuple[str, type[Hec]]]:
    handler = type("HecHandler", (Hec,), {"batches": [], "auth": [], "status": 200})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}/services/collector/event", handler
    server.shutdown()
    server.server_close()
    thread.join(5)


def test_http_sink_posts_hec_batches_with_the_token(migrated_db: Any, hec: Any,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    url, handler = hec
    monkeypatch.setenv("SPLUNK_TOKEN", "hec-secret-1234")
    db = migrated_db
    mutate(db, 5)
    config = sinks(f"{url}?token_env=SPLUNK_TOKEN&batch=2&index=audit", SPLUNK_TOKEN="x")
    result = forward_all(db, config)
    assert list(result.values())[0]["delivered"] == 5
    assert [len(b) for b in handler.batches] == [2, 2, 1]
    assert set(handler.auth) == {"Splunk hec-secret-1234"}
    first = handler.batches[0][0]
    assert set(first) == {"time", "host", "source", "sourcetype", "index", "event"}
    assert first["sourcetype"] == "certautopilot:audit" and first["index"] == "audit"
    assert first["event"]["seq"] == 1 and isinstance(first["time"], float)


def test_failing_sink_shows_in_readiness_and_metrics_not_as_unready(
        migrated_db: Any, hec: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    url, handler = hec
    handler.status = 503
    monkeypatch.setenv("SPLUNK_TOKEN", "hec-secret-1234")
    monkeypatch.setenv("CAP_AUDIT_SINKS", f"{url}?token_env=SPLUNK_TOKEN&name=siem")
    db = migrated_db
    mutate(db, 3)
    result = forward_all(db, sinks(f"{url}?token_env=SPLUNK_TOKEN&name=siem",
                                   SPLUNK_TOKEN="x"))
    assert "HTTP 503" in result["siem"]["error"]
    assert "hec-secret-1234" not in json.dumps(result)

    ready, detail = readiness(db)
    assert detail["audit_sinks"]["ok"] is True
    assert detail["audit_sinks"]["degraded"] is True
    siem = detail["audit_sinks"]["sinks"]["siem"]
    assert siem["status"] == "retrying" and siem["lag"] == 3 and "HTTP 503" in siem["last_error"]
    assert "hec-secret-1234" not in json.dumps(detail, default=str)

    monkeypatch.setattr(status, "FAILING_AFTER_SECONDS", 0.0)
    _, detail = readiness(db)
    assert detail["audit_sinks"]["sinks"]["siem"]["status"] == "failing"
    metrics = {(m.name, tuple(s.labels.values())): s.value
               for m in status.audit_metrics(db) for s in m.samples}
    assert metrics[("certautopilot_audit_sink_up", ("siem",))] == 0.0
    assert metrics[("certautopilot_audit_sink_failing", ("siem",))] == 1.0
    assert metrics[("certautopilot_audit_sink_lag_entries", ("siem",))] == 3.0
    assert metrics[("certautopilot_audit_head_seq", ())] == 3.0

    # Backoff: the next run does not hammer it; once it is back, everything arrives.
    assert forward_all(db, sinks(f"{url}?token_env=SPLUNK_TOKEN&name=siem",
                                 SPLUNK_TOKEN="x"))["siem"]["skipped"] == "backoff"
    handler.status = 200
    db[SINKS].update_one({"_id": "siem"}, {"$set": {"next_attempt_at": None}})
    forward_all(db, sinks(f"{url}?token_env=SPLUNK_TOKEN&name=siem", SPLUNK_TOKEN="x"))
    assert [e["event"]["seq"] for b in handler.batches for e in b] == [1, 2, 3]
    _, detail = readiness(db)
    assert detail["audit_sinks"]["degraded"] is False
    assert detail["audit_sinks"]["sinks"]["siem"] == {"status": "ok", "lag": 0}


def test_two_forwarders_never_send_to_one_sink_at_once(migrated_db: Any, tmp_path: Path) -> None:
    """The sink lease keeps the order when runs overlap: a second run stands aside."""
    db = migrated_db
    out = tmp_path / "audit.jsonl"
    config = sinks(f"file://{out}?batch=1")
    mutate(db, 6)
    gate = threading.Event()
    entered = threading.Event()

    class SlowSink:
        def __init__(self, spec: Any) -> None:
            from app.audit.sinks import FileSink

            self.spec, self.inner = spec, FileSink(spec)

        def send(self, entries: list[dict[str, Any]]) -> None:
            entered.set()
            gate.wait(10)
            self.inner.send(entries)

        def close(self) -> None:
            pass

    results: dict[str, Any] = {}
    first = threading.Thread(target=lambda: results.update(
        a=forward_all(db, config, owner="a", make_sink=SlowSink)))
    first.start()
    entered.wait(10)
    results["b"] = forward_all(db, config, owner="b")
    gate.set()
    first.join(30)
    assert results["b"][config[0].name] == {"skipped": "another forwarder holds this sink"}
    assert results["a"][config[0].name]["delivered"] == 6
    assert [json.loads(x)["seq"] for x in out.read_text().splitlines()] == list(range(1, 7))


def test_a_sink_that_is_not_reachable_at_all(migrated_db: Any) -> None:
    db = migrated_db
    mutate(db, 2)
    port = free_port()  # nothing listens there
    outcome = forward_all(db, sinks(f"syslog+tcp://127.0.0.1:{port}?name=down"))["down"]
    assert outcome["delivered"] == 0 and "Connection refused" in outcome["error"]
    state = db[SINKS].find_one({"_id": "down"})
    assert state["cursor"] == 0 and state["consecutive_failures"] == 1
    assert forward.backoff_seconds(1) == 5 and forward.backoff_seconds(10) == 60


def test_sink_metrics_are_served_at_metrics(migrated_db: Any, settings: Any, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    from app import create_app

    monkeypatch.setenv("CAP_AUDIT_SINKS", f"file://{tmp_path}/audit.jsonl?name=f")
    mutate(migrated_db, 2)
    client = create_app(settings).test_client()
    body = client.get("/metrics").get_data(as_text=True)
    assert "certautopilot_audit_head_seq 2.0" in body
    assert "certautopilot_audit_pending_entries 0.0" in body
    assert "certautopilot_audit_oldest_pending_seconds 0.0" in body
    assert 'certautopilot_audit_sink_lag_entries{sink="f"} 2.0' in body
    forward_all(migrated_db, sinks(f"file://{tmp_path}/audit.jsonl?name=f"))
    body = client.get("/metrics").get_data(as_text=True)
    assert 'certautopilot_audit_sink_lag_entries{sink="f"} 0.0' in body
    assert 'certautopilot_audit_sink_delivered_total{sink="f"} 2.0' in body
    assert 'certautopilot_audit_sink_up{sink="f"} 1.0' in body


def test_audit_verify_checks_a_forwarded_copy(migrated_db: Any, tmp_path: Path,
                                              cap_env: dict[str, str]) -> None:
    """The SIEM's copy survives the site: `audit verify --file` checks it, resends and
    all, and names tampering in it."""
    from click.testing import CliRunner

    from app.cli import cli

    db = migrated_db
    out = tmp_path / "audit.jsonl"
    mutate(db, 6)
    forward_all(db, sinks(f"file://{out}"))
    lines = out.read_text().splitlines(keepends=True)
    out.write_text("".join(lines + lines[3:]))  # a resent batch: at least once
    runner = CliRunner()
    ok = runner.invoke(cli, ["audit", "verify", "--file", str(out)])
    assert ok.exit_code == 0, ok.output
    assert "intact: 6 entries" in ok.output

    edited = json.loads(lines[2])
    edited["target"] = "thing:forged"
    out.write_text("".join([*lines[:2], json.dumps(edited) + "\n", *lines[3:]]))
    broken = runner.invoke(cli, ["audit", "verify", "--file", str(out), "--json"])
    assert broken.exit_code == 1
    assert json.loads(broken.stdout)["problem"]["kind"] == "edited"
    assert json.loads(broken.stdout)["problem"]["seq"] == 3

    out.write_text("".join([*lines[:2], *lines[3:]]))
    gone = runner.invoke(cli, ["audit", "verify", "--file", str(out), "--json"])
    assert gone.exit_code == 1
    assert json.loads(gone.stdout)["problem"] == {
        "seq": 3, "kind": "deleted", "message": "seq 3 is missing (line 3 has seq 4)"}
