"""Retry decisions come from ACME problem types, never from message text; polling starts
fast, backs off and honours Retry-After."""

from __future__ import annotations

import time

import pytest

from app.acme.client import PollSchedule, poll
from app.acme.errors import (
    AcmeNetworkError,
    AcmeProblem,
    AcmeTimeout,
    ChallengeFailed,
    Decision,
    OrderFailed,
    classify,
)

P = "urn:ietf:params:acme:error:"


@pytest.mark.parametrize("code, decision", [
    ("badNonce", Decision.RETRY_NOW),
    ("rateLimited", Decision.RETRY_AFTER),
    ("accountDoesNotExist", Decision.ACCOUNT_MISSING),
    ("orderNotReady", Decision.ORDER_NOT_READY),
    ("unauthorized", Decision.RECORD_AND_BACK_OFF),
    ("dns", Decision.RECORD_AND_BACK_OFF),
    ("connection", Decision.RECORD_AND_BACK_OFF),
    ("incorrectResponse", Decision.RECORD_AND_BACK_OFF),
    ("caa", Decision.RECORD_AND_BACK_OFF),
    ("rejectedIdentifier", Decision.RECORD_AND_BACK_OFF),
    ("badCSR", Decision.RECORD_AND_BACK_OFF),
    ("serverInternal", Decision.TRANSIENT),
])
def test_decisions_follow_the_problem_type(code, decision):
    assert classify(AcmeProblem(P + code, "whatever the text says")) is decision


def test_message_text_does_not_matter():
    # a detail that talks about rate limits does not make a serverInternal a rate limit
    problem = AcmeProblem(P + "serverInternal", "rateLimited badNonce too many requests")
    assert classify(problem) is Decision.TRANSIENT


def test_retry_after_on_any_problem_reschedules():
    problem = AcmeProblem(P + "serverInternal", "busy", http_status=503, retry_after=120)
    assert classify(problem) is Decision.RETRY_AFTER and problem.retry_after == 120


def test_failed_challenges_and_orders_back_off():
    assert classify(ChallengeFailed(P + "serverInternal", "x")) is Decision.RECORD_AND_BACK_OFF
    assert classify(OrderFailed(P + "serverInternal", "x")) is Decision.RECORD_AND_BACK_OFF
    assert classify(AcmeNetworkError("refused")) is Decision.TRANSIENT


def test_problem_documents_keep_their_context():
    problem = AcmeProblem.from_json(
        {"type": P + "rejectedIdentifier", "detail": "no", "status": 400,
         "identifier": {"type": "dns", "value": "x.example"},
         "subproblems": [{"type": P + "caa", "detail": "CAA forbids",
                          "identifier": {"type": "dns", "value": "y.example"}}]},
        url="https://ca.example/order")
    assert problem.problem_code == "rejectedIdentifier"
    assert problem.identifier == "x.example" and problem.http_status == 400
    assert "x.example" in str(problem) and "rejectedIdentifier" in str(problem)
    doc = problem.as_doc()
    assert doc["subproblems"] == [{"type": P + "caa", "detail": "CAA forbids",
                                   "identifier": "y.example"}]
    assert AcmeProblem("https://ca.example/custom", "x").problem_code is None


def test_poll_starts_fast_and_backs_off():
    calls = []

    def fetch():
        calls.append(time.monotonic())
        return len(calls), None

    value = poll(fetch, lambda n: n >= 6, what="x", schedule=PollSchedule(first=0.01,
                                                                          factor=2.0))
    assert value == 6
    gaps = [b - a for a, b in zip(calls, calls[1:], strict=False)]
    assert gaps[0] < 0.05
    assert gaps[-1] > gaps[0] * 4  # 0.01 → 0.16


def test_poll_honours_retry_after():
    calls = []

    def fetch():
        calls.append(time.monotonic())
        return len(calls), (0.3 if len(calls) == 1 else None)

    poll(fetch, lambda n: n >= 2, what="x", schedule=PollSchedule(first=0.01))
    assert calls[1] - calls[0] >= 0.27


def test_poll_gives_up_at_the_deadline():
    with pytest.raises(AcmeTimeout, match="validation"):
        poll(lambda: (0, None), lambda n: False, what="validation",
             schedule=PollSchedule(first=0.01, timeout=0.2))


def test_new_order_carries_replaces_and_profile():
    from acme import messages

    from app.acme.client import NewOrderWithReplaces

    order = NewOrderWithReplaces(
        identifiers=[messages.Identifier(typ=messages.IDENTIFIER_FQDN, value="a.example")],
        profile="shortlived", replaces="aYhba4dGQEHhs3uEe6CuLN4ByNQ.AIdlQyE")
    body = order.to_json()
    assert body["replaces"] == "aYhba4dGQEHhs3uEe6CuLN4ByNQ.AIdlQyE"
    assert body["profile"] == "shortlived"
    plain = NewOrderWithReplaces(identifiers=order.identifiers).to_json()
    assert "replaces" not in plain and "profile" not in plain


def test_account_keys_sign_with_the_matching_algorithm():
    import josepy as jose

    from app.acme.client import jwk_for
    from app.keys import generate_private_key

    assert jwk_for(generate_private_key("ec256"))[1] is jose.ES256
    assert jwk_for(generate_private_key("ec384"))[1] is jose.ES384
    assert jwk_for(generate_private_key("rsa2048"))[1] is jose.RS256
