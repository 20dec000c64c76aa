"""Real authoritative DNS servers for the dns-01 tests: Debian's knot (RFC 2136 updates
with TSIG) and Debian's PowerDNS (sqlite backend, HTTP API; lexicon's powerdns provider).

Each server listens on port 53 of its own random loopback address (127.x.y.z), so the NS
records of a zone can name it the way production does (the propagation check queries
every authoritative server on port 53) and parallel test sessions do not collide.
"""

from __future__ import annotations

import random
import secrets
import shutil
import socket
import socketserver
import sqlite3
import subprocess
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import dns.flags
import dns.message
import dns.name
import dns.query
import dns.rdatatype

from devstack.embedded import free_port

PDNS_SCHEMA = Path("/usr/share/pdns-backend-sqlite3/schema/schema.sqlite3.sql")


def free_loopback() -> str:
    """A loopback address whose port 53 (UDP and TCP) is free."""
    for _ in range(200):
        address = f"127.{random.randint(100, 250)}.{random.randint(1, 250)}." \
                  f"{random.randint(1, 250)}"
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp, \
                    socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
                udp.bind((address, 53))
                tcp.bind((address, 53))
            return address
        except OSError:
            continue
    raise RuntimeError("no free loopback address with port 53")


def txt_at(address: str, name: str) -> list[str]:
    """The TXT values ``address`` serves for ``name`` (asked directly, not recursively)."""
    answer = dns.query.udp(dns.message.make_query(name, dns.rdatatype.TXT), address,
                           timeout=2)
    return sorted(item.to_text().strip('"') for rrset in answer.answer
                  for item in rrset if rrset.rdtype == dns.rdatatype.TXT)


def _wait_serving(address: str, name: str, proc: subprocess.Popen[bytes],
                  log: Path) -> None:
    deadline = time.monotonic() + 30
    while True:
        try:
            reply = dns.query.udp(dns.message.make_query(name, dns.rdatatype.SOA), address,
                                  timeout=0.5)
            if reply.answer:
                return
        except Exception:  # noqa: BLE001 - not up yet
            pass
        if time.monotonic() > deadline or proc.poll() is not None:
            proc.kill()
            raise RuntimeError(f"{proc.args!r} did not start:\n{log.read_text()}")
        time.sleep(0.1)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@dataclass
class Zone:
    """A zone and its records: ``records`` are zone-file lines relative to the origin."""

    name: str
    nameservers: dict[str, str]  # NS host name (absolute, no dot) -> address
    records: list[str] = field(default_factory=list)

    def zone_file(self) -> str:
        lines = [f"$ORIGIN {self.name}.", "$TTL 60",
                 f"@ SOA {next(iter(self.nameservers))}. hostmaster.{self.name}. "
                 "1 3600 600 86400 60"]
        lines += [f"@ NS {ns}." for ns in self.nameservers]
        lines += [f"{ns}. A {address}" for ns, address in self.nameservers.items()
                  if ns.endswith(f".{self.name}")]
        return "\n".join(lines + self.records) + "\n"


@dataclass
class Knot:
    address: str
    key_name: str
    secret: str  # base64 TSIG secret
    proc: subprocess.Popen[bytes]

    def stop(self) -> None:
        _stop(self.proc)

    def update(self, zone: str, name: str, txt: list[str], add: bool = True) -> None:
        """Add (or delete) TXT values at ``name`` through a TSIG-signed RFC 2136 update."""
        import dns.rcode
        import dns.tsig
        import dns.tsigkeyring
        import dns.update

        update = dns.update.Update(zone, keyring=dns.tsigkeyring.from_text(
            {self.key_name: self.secret}), keyname=self.key_name,
            keyalgorithm=dns.tsig.HMAC_SHA256)
        for value in txt:
            if add:
                update.add(f"{name}.", 60, "TXT", f'"{value}"')
            else:
                update.delete(f"{name}.", "TXT", f'"{value}"')
        reply = dns.query.tcp(update, self.address, timeout=5)
        assert reply.rcode() == dns.rcode.NOERROR, dns.rcode.to_text(reply.rcode())


def start_knot(directory: Path, address: str, zones: list[Zone],
               key_name: str = "cap-key") -> Knot:
    """knotd serving ``zones`` on ``address``:53, accepting TSIG-signed updates."""
    import base64

    if shutil.which("knotd") is None:
        raise RuntimeError("needs knotd: run scripts/test or apt-get install knot")
    directory.mkdir(parents=True)
    secret = base64.b64encode(secrets.token_bytes(32)).decode()
    zone_conf = ""
    for zone in zones:
        (directory / f"{zone.name}.zone").write_text(zone.zone_file())
        zone_conf += (f"  - domain: {zone.name}\n    file: {directory}/{zone.name}.zone\n"
                      "    acl: update\n")
    (directory / "knot.conf").write_text(f"""
server:
    listen: {address}@53
    rundir: {directory}
    user: root
database:
    storage: {directory}
key:
  - id: {key_name}
    algorithm: hmac-sha256
    secret: {secret}
acl:
  - id: update
    key: {key_name}
    action: update
zone:
{zone_conf}""")
    log = directory / "knot.log"
    with open(log, "ab") as out:
        proc = subprocess.Popen(["knotd", "-c", str(directory / "knot.conf")], stdout=out,
                                stderr=out)
    _wait_serving(address, zones[0].name, proc, log)
    return Knot(address, key_name, secret, proc)


@dataclass
class PowerDns:
    address: str
    api_url: str
    api_key: str
    proc: subprocess.Popen[bytes]

    def stop(self) -> None:
        _stop(self.proc)


def start_powerdns(directory: Path, address: str, zones: list[Zone]) -> PowerDns:
    """pdns_server (gsqlite3 backend, DB from the schema Debian ships) serving ``zones``
    on ``address``:53, with its HTTP API on a free port of 127.0.0.1."""
    if shutil.which("pdns_server") is None or not PDNS_SCHEMA.exists():
        raise RuntimeError("needs pdns-server and pdns-backend-sqlite3: run scripts/test")
    directory.mkdir(parents=True)
    database = directory / "pdns.sqlite3"
    with sqlite3.connect(database) as conn:
        conn.executescript(PDNS_SCHEMA.read_text())
        for zone in zones:
            conn.execute("INSERT INTO domains (name, type) VALUES (?, 'NATIVE')",
                         (zone.name,))
            domain_id = conn.execute("SELECT id FROM domains WHERE name = ?",
                                     (zone.name,)).fetchone()[0]
            rows = [(zone.name, "SOA", f"{next(iter(zone.nameservers))} "
                     f"hostmaster.{zone.name} 1 3600 600 86400 60")]
            rows += [(zone.name, "NS", ns) for ns in zone.nameservers]
            rows += [(ns, "A", addr) for ns, addr in zone.nameservers.items()
                     if ns.endswith(f".{zone.name}")]
            for line in zone.records:  # "label TYPE content"
                label, rtype, content = line.split(None, 2)
                owner = zone.name if label == "@" else f"{label}.{zone.name}"
                rows.append((owner, rtype, content.rstrip(".") if rtype == "CNAME"
                             else content))
            conn.executemany("INSERT INTO records (domain_id, name, type, content, ttl, "
                             "auth) VALUES (?, ?, ?, ?, 60, 1)",
                             [(domain_id, *row) for row in rows])
    api_port, api_key = free_port(), secrets.token_hex(16)
    (directory / "pdns.conf").write_text(f"""
launch=gsqlite3
gsqlite3-database={database}
local-address={address}
local-port=53
api=yes
api-key={api_key}
webserver=yes
webserver-address=127.0.0.1
webserver-port={api_port}
webserver-allow-from=127.0.0.0/8
socket-dir={directory}
guardian=no
daemon=no
disable-syslog=yes
loglevel=4
cache-ttl=0
negquery-cache-ttl=0
query-cache-ttl=0
""")
    log = directory / "pdns.log"
    with open(log, "ab") as out:
        proc = subprocess.Popen(["pdns_server", f"--config-dir={directory}"], stdout=out,
                                stderr=out)
    _wait_serving(address, zones[0].name, proc, log)
    api_url = f"http://127.0.0.1:{api_port}"
    deadline = time.monotonic() + 30
    while True:  # the API listens a moment after DNS
        try:
            request = urllib.request.Request(f"{api_url}/api/v1/servers/localhost",
                                             headers={"X-API-Key": api_key})
            with urllib.request.urlopen(request, timeout=1):
                break
        except OSError:
            if time.monotonic() > deadline:
                _stop(proc)
                raise RuntimeError(f"pdns API did not answer:\n{log.read_text()}") from None
            time.sleep(0.1)
    return PowerDns(address, api_url, api_key, proc)


@dataclass
class Forwarder:
    """A recursive resolver for the test's zones: what the CA's resolver is in
    production. Each question goes to the authoritative server of the closest zone, and
    CNAMEs are chased across servers (the answer carries the whole chain)."""

    address: str
    server: socketserver.UDPServer
    thread: threading.Thread

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


def _authority(name: dns.name.Name, zones: dict[str, str]) -> str | None:
    best = max((z for z in zones if name.is_subdomain(dns.name.from_text(z))),
               key=len, default=None)
    return zones[best] if best else None


def start_forwarder(zones: dict[str, str]) -> Forwarder:
    """Serve recursive answers on a free loopback address (port 53) for ``zones``
    (zone -> address of its authoritative server)."""
    address = free_loopback()

    class Handler(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            data, sock = self.request
            request = dns.message.from_wire(data)
            response = dns.message.make_response(request)
            response.flags |= dns.flags.RA
            question = request.question[0]
            name, seen = question.name, set()
            for _ in range(10):
                server = _authority(name, zones)
                if server is None or name in seen:
                    break
                seen.add(name)
                reply = dns.query.udp(dns.message.make_query(name, question.rdtype),
                                      server, timeout=2)
                response.set_rcode(reply.rcode())
                cname = None
                for rrset in reply.answer:
                    response.answer.append(rrset)
                    if rrset.rdtype == dns.rdatatype.CNAME and rrset.name == name:
                        cname = rrset[0].target
                if cname is None or question.rdtype == dns.rdatatype.CNAME or any(
                        r.rdtype == question.rdtype for r in reply.answer):
                    if not reply.answer:
                        response.authority = reply.authority
                    break
                name = cname
            sock.sendto(response.to_wire(), self.client_address)

    server = socketserver.ThreadingUDPServer((address, 53), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    return Forwarder(address, server, thread)
