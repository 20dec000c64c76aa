"""The API's schema patterns are subsets of what the domain accepts: anything a client
(or a fuzzer) generates from the certificate and alert-channel schemas passes the
domain's own checks, so the server never refuses what its OpenAPI document allows."""

from __future__ import annotations

import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from app.acme.dns import config as dns_config
from app.acme.identifiers import normalize_names
from app.api.certificates import schemas as cert_schemas
from app.domain import drift
from app.ops.alerts import channels

pytestmark = pytest.mark.unit

FAST = settings(max_examples=50, deadline=None, suppress_health_check=list(HealthCheck),
                database=None, derandomize=True)


def pattern(text: str) -> st.SearchStrategy[str]:
    # As schemathesis generates them: the whole string matches (no final newline).
    return st.from_regex(re.compile(text), fullmatch=True)


@pytest.mark.parametrize("challenge", sorted(cert_schemas.NAMES_BY_CHALLENGE))
def test_names_the_schema_allows_for_a_challenge_are_accepted(challenge: str) -> None:
    @FAST
    @given(names=st.lists(pattern(cert_schemas.NAMES_BY_CHALLENGE[challenge]).filter(
        lambda n: len(n) <= 253), min_size=1, max_size=5))
    def check(names: list[str]) -> None:
        assert all(re.match(cert_schemas.NAME_PATTERN, n) for n in names)
        normalize_names(names, challenge)

    check()


def test_names_the_schema_refuses_for_a_challenge() -> None:
    allows = {kind: re.compile(p) for kind, p in cert_schemas.NAMES_BY_CHALLENGE.items()}
    assert not allows["http-01"].match("*.example.com")
    assert not allows["tls-alpn-01"].match("192.0.2.1")
    assert not allows["dns-01"].match("192.0.2.1")
    for bad in ("xn--a.example", "ab--cd.example", "a.1", "01.2.3.4", "a..b", "-a.example"):
        assert not re.match(cert_schemas.NAME_PATTERN, bad), bad


@FAST
@given(host=pattern(cert_schemas.ENDPOINT_HOST_PATTERN).filter(lambda h: len(h) <= 253),
       sni=pattern(cert_schemas.SNI_PATTERN).filter(lambda h: len(h) <= 253))
def test_endpoints_the_schema_allows_are_accepted(host: str, sni: str) -> None:
    drift.parse_endpoint({"host": host, "port": 443, "sni": sni})


@FAST
@given(zone=pattern(cert_schemas.ZONE_PATTERN).filter(lambda z: len(z) <= 253),
       option=pattern(cert_schemas.OPTION_NAME_PATTERN),
       credential=pattern(cert_schemas.CREDENTIAL_NAME_PATTERN),
       env=pattern(dns_config.ENV_RE.pattern))
def test_dns01_settings_the_schema_allows_are_accepted(zone: str, option: str,
                                                       credential: str, env: str) -> None:
    dns_config.validate_dns01_config({
        "type": "dns-01", "provider": "cloudflare", "zone": zone,
        "options": {option: "x"}, "credentials_env": {credential: env}})


@FAST
@given(url=st.one_of(pattern(channels.HTTPS_URL_PATTERN), pattern(channels.SMTP_URL_PATTERN)),
       name=pattern(channels.NAME_PATTERN),
       to=st.lists(pattern(channels.EMAIL_PATTERN), min_size=1, max_size=3))
def test_alert_channels_the_schema_allows_are_accepted(url: str, name: str,
                                                       to: list[str]) -> None:
    spec: dict[str, object] = {"name": name, "url": url}
    if url.lower().startswith("smtp"):
        spec["to"] = to
    channels.validate(spec, rule_names=("drift",))
