"""tests/helpers/promql.py evaluates the PromQL shapes the chart's adapter rule uses as
Prometheus does (checked on hand-computed series)."""

import pytest

from tests.helpers.promql import evaluate

SERIES = [
    ({"__name__": "q", "kind": "a", "pod": "p0", "ns": "x"}, 3.0),
    ({"__name__": "q", "kind": "a", "pod": "p1", "ns": "x"}, 3.0),
    ({"__name__": "q", "kind": "b", "pod": "p0", "ns": "x"}, 2.0),
    ({"__name__": "q", "kind": "b", "pod": "p1", "ns": "y"}, 9.0),
    ({"__name__": "other", "kind": "a", "pod": "p0", "ns": "x"}, 50.0),
]


@pytest.mark.parametrize(("query", "expected"), [
    ('sum(q{ns="x"})', [({}, 8.0)]),
    ('sum(max by (kind) (q{ns="x"}))', [({}, 5.0)]),
    ('sum by (kind) (q)', [({"kind": "a"}, 6.0), ({"kind": "b"}, 11.0)]),
    ('max(q) by (ns)', [({"ns": "x"}, 3.0), ({"ns": "y"}, 9.0)]),
    ('count without (pod, kind) (q)', [({"ns": "x"}, 3.0), ({"ns": "y"}, 1.0)]),
    ('sum(q{ns="nowhere"}) or vector(0)', [({}, 0.0)]),
    ('sum(q{ns="y"}) or vector(0)', [({}, 9.0)]),
    ('q{kind=~"a|b", ns!="x"}', [(SERIES[3][0], 9.0)]),
    ('{__name__="other"}', [(SERIES[4][0], 50.0)]),
])
def test_evaluates_like_prometheus(query, expected) -> None:
    assert evaluate(query, SERIES) == expected


@pytest.mark.parametrize("query", ["rate(q[5m])", "q + 1", "topk(1, q)", "sum(q"])
def test_refuses_what_it_does_not_implement(query) -> None:
    with pytest.raises(ValueError):
        evaluate(query, SERIES)
