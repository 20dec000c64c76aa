"""The order state machine: forward-only, terminal states final."""

from __future__ import annotations

from app.domain import orders


def test_every_state_has_a_transition_entry():
    assert set(orders.TRANSITIONS) == set(orders.STATES)
    for targets in orders.TRANSITIONS.values():
        assert targets <= set(orders.STATES)


def test_terminal_states_have_no_way_out():
    for state in orders.TERMINAL:
        assert orders.TRANSITIONS[state] == frozenset()
    assert set(orders.ACTIVE) | orders.TERMINAL == set(orders.STATES)


def test_the_happy_path_is_allowed():
    path = ["created", "pending", "ready", "finalizing", "processing", "valid", "downloaded",
            "completed"]
    for current, target in zip(path, path[1:], strict=False):
        assert orders.can_transition(current, target), (current, target)


def test_no_step_goes_back():
    order = {s: i for i, s in enumerate(["created", "pending", "ready", "finalizing",
                                         "processing", "valid", "downloaded", "completed"])}
    for current, targets in orders.TRANSITIONS.items():
        for target in targets:
            if current in order and target in order and target != current:
                assert order[target] > order[current], (current, target)


def test_resume_can_find_the_ca_ahead():
    # a crash after the CA moved but before the save: the next read may jump forward
    assert orders.can_transition("pending", "valid")
    assert orders.can_transition("ready", "valid")
    assert orders.can_transition("finalizing", "finalizing")  # re-fenced by a new lease
    assert not orders.can_transition("valid", "pending")
    assert not orders.can_transition("completed", "pending")


def test_new_orders_are_created_only_from_invalid_or_expired():
    # a finished or failed order never moves again: a new document replaces it
    for state in ("invalid", "expired", "abandoned", "completed"):
        assert not orders.TRANSITIONS[state]
    assert set(orders.sources_of("finalizing")) == {"pending", "ready", "finalizing"}
