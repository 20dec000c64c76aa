"""Certificate names are validated and normalised before anything reaches a CA."""

from __future__ import annotations

import pytest

from app.acme.identifiers import InvalidName, normalize_names
from app.errors import ValidationFailed


def values(names, challenge="http-01"):
    return [(i.type, i.value) for i in normalize_names(names, challenge)]


def test_dns_names_are_lowercased_and_idna_encoded():
    assert values(["WWW.Example.COM", "bücher.example", "example.com."]) == [
        ("dns", "www.example.com"), ("dns", "xn--bcher-kva.example"), ("dns", "example.com")]


def test_duplicates_after_normalisation_are_merged_in_order():
    assert values(["b.example", "A.example", "a.example", "B.EXAMPLE"]) == [
        ("dns", "b.example"), ("dns", "a.example")]


def test_wildcards_only_with_dns01():
    assert values(["*.example.com", "example.com"], "dns-01") == [
        ("dns", "*.example.com"), ("dns", "example.com")]
    with pytest.raises(InvalidName, match="dns-01"):
        normalize_names(["*.example.com"], "http-01")


@pytest.mark.parametrize("bad", ["*.*.x", "*.*.example.com", "a.*.example.com", "f*o.example",
                                 "*example.com", "*.com", "**.example.com"])
def test_bad_wildcards_are_refused(bad):
    with pytest.raises(InvalidName):
        normalize_names([bad], "dns-01")


def test_ip_literals_only_where_the_challenge_can_prove_them():
    assert values(["127.0.0.1", "[2001:DB8::1]", "::1"]) == [
        ("ip", "127.0.0.1"), ("ip", "2001:db8::1"), ("ip", "::1")]
    for ip in ("192.0.2.1", "2001:db8::1"):
        with pytest.raises(InvalidName, match="IP addresses are not allowed"):
            normalize_names([ip], "dns-01")


@pytest.mark.parametrize("bad, reason", [
    ("a" * 64 + ".example.com", "longer than 63"),
    (".".join(["a" * 60] * 5) + ".com", "longer than 253"),
    ("xn--zz.example", "not valid IDNA"),
    ("xn--a.example", "not valid IDNA"),
    ("\U0001F4A9.example", "not valid IDNA"),
    ("ab--cd.example", "reserved for IDNA"),
    ("under_score.example", "letters, digits"),
    ("-lead.example", "letters, digits"),
    ("trail-.example", "letters, digits"),
    ("a..b.example", "empty label"),
    (".example.com", "empty label"),
    ("localhost", "two labels"),
    ("1.2.3.999", "all digits"),
    ("127.000.0.1", "all digits"),
    ("exa mple.com", "white space"),
    (" example.com", "spaces"),
    ("example.com\n", "spaces"),
    ("", "empty"),
])
def test_invalid_names_are_refused_with_a_reason(bad, reason):
    with pytest.raises(InvalidName, match=reason) as info:
        normalize_names(["ok.example", bad], "http-01")
    assert info.value.status == 422 and "names" in info.value.errors


@pytest.mark.parametrize("names", [[], "example.com", None, [1], ["ok.example", None]])
def test_names_must_be_a_list_of_strings(names):
    with pytest.raises(ValidationFailed):
        normalize_names(names, "http-01")


def test_at_most_100_names():
    assert len(normalize_names([f"n{i}.example" for i in range(100)], "http-01")) == 100
    with pytest.raises(ValidationFailed, match="at most 100"):
        normalize_names([f"n{i}.example" for i in range(101)], "http-01")
