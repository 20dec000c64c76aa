"""A small instant-query evaluator for the PromQL the chart's adapter rule uses.

No kept Python library evaluates PromQL (promql-parser and promqlpy only parse), so this
covers exactly the shapes the rule may take: vector selectors with ``= != =~ !~``
matchers, the aggregations ``sum max min count avg`` with ``by``/``without`` (before or
after the parenthesis), ``vector(<number>)`` and ``or``. Anything else raises
``ValueError``, so a rule that grows beyond this fails the test instead of being
evaluated wrongly.

A series is ``(labels, value)`` where ``labels`` includes ``__name__``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable

Labels = dict[str, str]
Sample = tuple[Labels, float]

_TOKEN = re.compile(r'\s*(?:(?P<num>\d+(?:\.\d+)?)|(?P<str>"(?:[^"\\]|\\.)*")'
                    r'|(?P<op>=~|!~|!=|=|[(){},])|(?P<ident>[A-Za-z_:][A-Za-z0-9_:]*))')
_AGGREGATIONS: dict[str, Callable[[list[float]], float]] = {
    "sum": sum, "max": max, "min": min, "count": lambda v: float(len(v)),
    "avg": lambda v: sum(v) / len(v)}


def _tokens(query: str) -> list[str]:
    out: list[str] = []
    pos = 0
    query = query.strip()
    while pos < len(query):
        match = _TOKEN.match(query, pos)
        if not match or match.end() == pos:
            raise ValueError(f"unsupported PromQL at {query[pos:]!r}")
        out.append(match.group(match.lastgroup or "op"))
        pos = match.end()
        while pos < len(query) and query[pos].isspace():
            pos += 1
    return out


def _key(labels: Labels) -> tuple[tuple[str, str], ...]:
    return tuple(sorted((k, v) for k, v in labels.items() if k != "__name__"))


class _Parser:
    def __init__(self, query: str, series: list[Sample]) -> None:
        self.toks = _tokens(query)
        self.i = 0
        self.series = series

    def peek(self) -> str | None:
        return self.toks[self.i] if self.i < len(self.toks) else None

    def take(self, expected: str | None = None) -> str:
        tok = self.peek()
        if tok is None or (expected is not None and tok != expected):
            raise ValueError(f"expected {expected or 'a token'}, got {tok!r}")
        self.i += 1
        return tok

    def parse(self) -> list[Sample]:
        result = self.expr()
        if self.peek() is not None:
            raise ValueError(f"unsupported PromQL after {self.toks[:self.i]}: {self.peek()!r}")
        return result

    def expr(self) -> list[Sample]:
        left = self.term()
        while self.peek() == "or":
            self.take()
            right = self.term()
            seen = {_key(labels) for labels, _ in left}
            left = left + [s for s in right if _key(s[0]) not in seen]
        return left

    def term(self) -> list[Sample]:
        tok = self.peek()
        if tok in _AGGREGATIONS:
            return self.aggregation()
        if tok == "vector":
            self.take()
            self.take("(")
            value = float(self.take())
            self.take(")")
            return [({}, value)]
        return self.selector()

    def grouping(self) -> tuple[str, list[str]] | None:
        if self.peek() not in ("by", "without"):
            return None
        mode = self.take()
        self.take("(")
        labels: list[str] = []
        while self.peek() != ")":
            labels.append(self.take())
            if self.peek() == ",":
                self.take()
        self.take(")")
        return mode, labels

    def aggregation(self) -> list[Sample]:
        op = _AGGREGATIONS[self.take()]
        grouping = self.grouping()
        self.take("(")
        inner = self.expr()
        self.take(")")
        grouping = grouping or self.grouping()
        groups: dict[tuple[tuple[str, str], ...], list[float]] = {}
        for labels, value in inner:
            if grouping is None:
                kept: Labels = {}
            elif grouping[0] == "by":
                kept = {k: v for k, v in labels.items() if k in grouping[1]}
            else:
                kept = {k: v for k, v in labels.items()
                        if k not in grouping[1] and k != "__name__"}
            groups.setdefault(_key(kept), []).append(value)
        return [(dict(key), op(values)) for key, values in groups.items()]

    def selector(self) -> list[Sample]:
        matchers: list[tuple[str, str, str]] = []
        if self.peek() not in ("{", None):
            matchers.append(("__name__", "=", self.take()))
        if self.peek() == "{":
            self.take("{")
            while self.peek() != "}":
                label = self.take()
                op = self.take()
                if op not in ("=", "!=", "=~", "!~"):
                    raise ValueError(f"unsupported matcher {op!r}")
                raw = self.take()
                if not raw.startswith('"'):
                    raise ValueError(f"expected a quoted value, got {raw!r}")
                matchers.append((label, op, bytes(raw[1:-1], "utf-8")
                                 .decode("unicode_escape")))
                if self.peek() == ",":
                    self.take()
            self.take("}")
        if not matchers:
            raise ValueError("empty selector")
        return [(labels, value) for labels, value in self.series
                if all(_matches(labels.get(name, ""), op, want)
                       for name, op, want in matchers)]


def _matches(have: str, op: str, want: str) -> bool:
    if op == "=":
        return have == want
    if op == "!=":
        return have != want
    full = re.fullmatch(want, have) is not None
    return full if op == "=~" else not full


def evaluate(query: str, series: Iterable[Sample]) -> list[Sample]:
    """The instant vector ``query`` yields over ``series``."""
    return _Parser(query, list(series)).parse()
