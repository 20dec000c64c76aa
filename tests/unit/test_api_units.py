"""API pieces that need no database: CAP_API_RATE_LIMIT, tokens' form and scopes,
cursors, ETags, the gunicorn settings, and the OpenAPI document."""

from __future__ import annotations

import hashlib
import re
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest
from bson import ObjectId

from app.config import ConfigError, load_settings

URI = "mongodb://m0,m1,m2/certautopilot?replicaSet=rs0"


@pytest.mark.parametrize(("raw", "expected"), [
    (None, (6000, 60)), ("100/second", (100, 1)), ("50/minute", (50, 60)),
    ("7/hour", (7, 3600)), ("off", (0, 60)), ("0", (0, 60)), (" 20/Minute ", (20, 60)),
])
def test_rate_limit_setting(raw, expected) -> None:
    env = {"CAP_MONGO_URI": URI} | ({"CAP_API_RATE_LIMIT": raw} if raw is not None else {})
    settings = load_settings(env)
    assert (settings.api_rate_limit, settings.api_rate_window_seconds) == expected


@pytest.mark.parametrize("raw", ["100", "x/minute", "-5/minute", "5/day", "5/", "/minute",
                                 "1.5/second"])
def test_bad_rate_limit_names_the_variable(raw) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings({"CAP_MONGO_URI": URI, "CAP_API_RATE_LIMIT": raw})
    assert caught.value.variable == "CAP_API_RATE_LIMIT"
    assert "6000/minute" in str(caught.value)


def test_tokens_are_256_random_bits_and_hashed() -> None:
    from app.domain.tokens import TOKEN_RE, generate_token, hash_token

    seen = {generate_token() for _ in range(200)}
    assert len(seen) == 200
    for token in seen:
        assert TOKEN_RE.match(token)
        assert len(token) == 4 + 43  # base64url of 32 bytes, no padding
        assert hash_token(token) == hashlib.sha256(token.encode()).hexdigest()


def test_scopes_and_grants() -> None:
    from app.domain.tokens import Principal, check_grant, normalize_scopes
    from app.errors import Forbidden, ValidationFailed

    assert normalize_scopes(["write", "read", "read"], admin=False) == ["read", "write"]
    assert normalize_scopes(["read"], admin=True) == ["admin"]
    for bad in (["admin"], [], ["fly"]):
        with pytest.raises(ValidationFailed):
            normalize_scopes(bad, admin=False)
    writer = Principal("tok_1", "prj_a", frozenset({"read", "write"}))
    check_grant(writer, "prj_a", ["read"])
    with pytest.raises(Forbidden):
        check_grant(writer, "prj_a", ["keys:export"])
    with pytest.raises(Forbidden):
        check_grant(writer, "prj_b", ["read"])
    with pytest.raises(Forbidden):
        check_grant(writer, None, ["admin"])
    admin = Principal("tok_2", None, frozenset({"admin"}))
    assert admin.has("keys:export") and admin.can_see("prj_b") and admin.can_see(None)
    assert not writer.can_see("prj_b") and not writer.can_see(None)
    assert not writer.has("keys:export")


def test_cursors_round_trip_and_refuse_garbage() -> None:
    import re

    from app.api.common import CURSOR_PATTERN, BadRequest, decode_cursor, encode_cursor

    when = datetime(2026, 11, 27, 12, 0, 0, 123000, tzinfo=UTC)
    for values in ([when, "crt_1"], [None, "x"], [when, ObjectId()], [3, 4], [7]):
        cursor = encode_cursor(values)
        assert re.match(CURSOR_PATTERN, cursor), cursor  # what the schema publishes
        assert decode_cursor(cursor) == values
    for garbage in ("", "%%%", "eyJrIjpbXX0", "d12~", "x1", "d1~d2~d3~d4~d5", "s" + "a" * 201):
        assert not re.match(CURSOR_PATTERN, garbage)
        with pytest.raises(BadRequest):
            decode_cursor(garbage)


def test_etags_follow_the_representation() -> None:
    from app.api.common import etag_of

    a = etag_of({"id": "x", "version": 1, "names": ["a"]})
    assert a == etag_of({"names": ["a"], "version": 1, "id": "x"})
    assert a != etag_of({"id": "x", "version": 2, "names": ["a"]})
    assert re.fullmatch(r'"[0-9a-f]{32}"', a)


def test_gunicorn_settings_follow_the_cpus_and_fit_the_grace_period() -> None:
    code = ("import app.gunicorn_conf as c, json; print(json.dumps({'w': c.workers, "
            "'t': c.threads, 'g': c.graceful_timeout, 'cpu': c.cpu_limit(), "
            "'prom': __import__('os').environ.get('PROMETHEUS_MULTIPROC_DIR')})); "
            "c.on_exit(None)")
    env = {"PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                         text=True, check=True)
    import json

    values = json.loads(out.stdout)
    assert values["w"] == min(8, values["cpu"] * 2 + 1)
    assert values["t"] == 4
    assert values["g"] < 45  # the chart's terminationGracePeriodSeconds
    assert values["prom"] and not Path(values["prom"]).exists()  # removed at exit
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**env, "CAP_API_WORKERS": "3", "CAP_API_THREADS": "2"},
                         check=True)
    assert json.loads(out.stdout)["w"] == 3
    bad = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**env, "CAP_API_WORKERS": "many"})
    assert bad.returncode != 0 and "CAP_API_WORKERS" in bad.stderr


def test_json_access_log_line() -> None:
    import logging
    from datetime import timedelta
    from types import SimpleNamespace

    from app.gunicorn_logging import JsonLogger

    records: list[str] = []

    class Capture(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record.getMessage())

    logger = JsonLogger.__new__(JsonLogger)
    logger.access_log = logging.getLogger("test.access")
    logger.access_log.handlers = [Capture()]
    logger.access_log.setLevel(logging.INFO)
    logger.access_log.propagate = False
    logger.cfg = SimpleNamespace(accesslog="-", logconfig=None, logconfig_dict=None,
                                 logconfig_json=None, syslog=False)
    response = SimpleNamespace(status="201 CREATED", sent=12,
                               headers=[("X-Request-ID", "rid-1"), ("Content-Type", "x")])
    environ = {"REQUEST_METHOD": "POST", "PATH_INFO": "/api/v1/projects",
               "QUERY_STRING": "", "REMOTE_ADDR": "10.0.0.1",
               "HTTP_USER_AGENT": 'evil "quote" agent'}
    logger.access(response, None, environ, timedelta(milliseconds=12.5))
    import json

    entry = json.loads(records[-1])
    assert entry["status"] == 201 and entry["request_id"] == "rid-1"
    assert entry["method"] == "POST" and entry["duration_ms"] == 12.5
    assert entry["user_agent"] == 'evil "quote" agent'


def test_openapi_documents_every_operation() -> None:
    from app import create_app

    settings = load_settings({"CAP_MONGO_URI": URI, "CAP_LOG_FORMAT": "json"})
    spec = create_app(settings).test_client().get("/openapi.json").json
    assert spec["openapi"].startswith("3.")
    assert spec["components"]["securitySchemes"]["bearerAuth"]["scheme"] == "bearer"
    assert set(spec["components"]["schemas"]["Error"]["properties"]) == {
        "code", "status", "message", "errors"}
    operations = [(path, method, op) for path, ops in spec["paths"].items()
                  for method, op in ops.items() if method in ("get", "post", "patch",
                                                              "delete", "put")]
    assert len(operations) >= 35
    for path, method, op in operations:
        where = f"{method.upper()} {path}"
        assert op.get("summary"), f"{where}: no summary (view docstring)"
        responses = op["responses"]
        assert any(code.startswith("2") for code in responses), where
        assert "400" in responses and "503" in responses, where
        if path.startswith("/api/v1"):
            assert op["security"] == [{"bearerAuth": []}], where
            assert op["x-scope"] in ("read", "write", "keys:export", "admin"), where
            for code in ("401", "403", "404", "422", "429"):
                assert code in responses, f"{where}: {code} undocumented"
            if method == "post":
                assert "Idempotency-Key" in [p["name"] for p in op.get("parameters", [])]
    for name in ("TooManyRequests", "ServiceUnavailable"):
        assert "Retry-After" in spec["components"]["responses"][name]["headers"]
    key = spec["paths"]["/api/v1/certificates/{certificate_id}/private-key"]["get"]
    assert key["x-scope"] == "keys:export"
    assert spec["paths"]["/api/v1/certificates/{certificate_id}"]["get"]["responses"][
        "200"]["headers"]["ETag"]


def test_a_list_window_is_the_intersection_of_its_range_and_the_filters() -> None:
    from app.api.common import narrow_range

    a, b, c = (datetime(2026, 1, d, tzinfo=UTC) for d in (1, 2, 3))
    assert narrow_range(None, {}) == {}
    assert narrow_range({"$lt": c}, {"$gte": a, "$lt": b}) == {"$gte": a, "$lt": b}
    assert narrow_range({"$lt": b}, {"$gte": a, "$lt": c}) == {"$gte": a, "$lt": b}
    assert narrow_range({"$lte": b}, {"$lt": b}) == {"$lt": b}  # the stricter bound
    assert narrow_range({"$gt": a}, {"$gte": a}) == {"$gt": a}
    assert narrow_range({"$lt": b}, {"$gte": b}) is None  # nothing left: no query
    assert narrow_range({"$lte": b}, {"$gte": b}) == {"$gte": b, "$lte": b}
    assert narrow_range({"$lt": a}, {"$gte": b, "$lt": c}) is None
