"""dns-01 challenge specs: what is refused (clearly) before anything is stored."""

from __future__ import annotations

import pytest

from app.acme.dns.config import hosted_providers, validate_dns01_config
from app.domain import certspec
from app.errors import ValidationFailed

PDNS = {"type": "dns-01", "provider": "powerdns", "options": {"pdns_server": "http://x"},
        "credentials_env": {"auth_token": "CAP_PDNS_KEY"}}


def test_lexicon_providers_are_listed_without_importing_them():
    names = hosted_providers()
    assert {"powerdns", "cloudflare", "route53"} <= set(names)
    assert "auto" not in names


def test_hosted_spec_is_normalised():
    out = validate_dns01_config(PDNS)
    assert out == {**PDNS, "propagation_timeout": 120, "follow_cname": True}


@pytest.mark.parametrize("change, message", [
    ({"provider": "nosuch"}, "unknown dns-01 provider 'nosuch'"),
    ({"provider": None}, "dns-01 needs a provider"),
    ({"options": {"auth_token": "s3cret"}}, "auth_token is a credential"),
    ({"credentials_env": {"auth_token": "s3cret"}}, "must name a CAP_* environment"),
    ({"server": "127.0.0.1"}, "unknown dns-01 powerdns options: server"),
    ({"resolvers": ["not-an-ip"]}, "resolver 'not-an-ip' is not an IP address"),
    ({"resolvers": [5]}, "resolver 5 is not an IP address"),
    ({"propagation_timeout": -1}, "propagation_timeout must be 0-3600"),
    ({"zone": "nodot"}, "zone must be a DNS name"),
])
def test_bad_hosted_specs(change, message):
    with pytest.raises(ValidationFailed, match=message.replace("*", r"\*")):
        validate_dns01_config({**PDNS, **change})


def test_a_secret_never_reaches_the_error():
    with pytest.raises(ValidationFailed) as caught:
        validate_dns01_config({**PDNS, "credentials_env": {"auth_token": "hunter2-secret"}})
    assert "hunter2" not in caught.value.message


def test_rfc2136_zone_is_optional_now():
    out = validate_dns01_config({"type": "dns-01", "provider": "rfc2136", "server": "ns1",
                                 "tsig_key_name": "k", "tsig_secret_env": "CAP_TSIG"})
    assert "zone" not in out and out["port"] == 53


@pytest.mark.parametrize("challenge", ["http-01", "tls-alpn-01"])
def test_wildcards_need_dns01(challenge):
    with pytest.raises(ValidationFailed, match="wildcards need the dns-01 challenge"):
        certspec.validate_spec({"names": ["*.example.com"], "challenge": challenge})
