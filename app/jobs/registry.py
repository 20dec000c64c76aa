"""Job kinds and their handlers: the registry the runner looks kinds up in.

The application's own kinds are listed in one place, ``app.handlers.HANDLERS``, and
added (``add``) by ``app.handlers.load_handlers`` when a worker starts; this package
knows none of them.

A handler is ``def handle(ctx: JobContext) -> dict | None``; its return value is stored
as the job's ``result``. Per kind it may set ``max_attempts`` (default
``CAP_JOB_MAX_ATTEMPTS``), the exponential backoff between failed attempts
(``backoff_base_seconds`` doubling up to ``backoff_max_seconds``, with jitter) and a
``validate(payload)`` that raises ``ValueError`` for a payload it cannot run (the job
then goes ``dead`` with that message, without calling the handler).

``CAP_EXTRA_HANDLER_MODULES`` (comma-separated module names) adds modules at start
(``load_modules``), which register their kinds with ``@register_handler``: a hook for
tests, benchmarks and operators' own job kinds, not needed in production.
"""

from __future__ import annotations

import importlib
import logging
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

# A handler takes an app.jobs.JobContext; not named here, where the context module (which
# reaches this registry through the job store) would make an import cycle.
Handler = Callable[..., "dict[str, Any] | None"]
Validator = Callable[[dict[str, Any]], None]

KIND_RE = re.compile(r"^[a-z][a-z0-9_]*(\.[a-z0-9_]+)*$")
DEFAULT_BACKOFF_BASE_SECONDS = 5.0
DEFAULT_BACKOFF_MAX_SECONDS = 600.0


@dataclass(frozen=True)
class HandlerSpec:
    kind: str
    fn: Handler
    max_attempts: int | None = None
    backoff_base_seconds: float = DEFAULT_BACKOFF_BASE_SECONDS
    backoff_max_seconds: float = DEFAULT_BACKOFF_MAX_SECONDS
    validate: Validator | None = None


_handlers: dict[str, HandlerSpec] = {}
_lock = threading.Lock()
_loaded: list[str] = []


def valid_kind(kind: object) -> bool:
    return isinstance(kind, str) and len(kind) <= 100 and bool(KIND_RE.match(kind))


def register_handler(kind: str, *, max_attempts: int | None = None,
                     backoff_base_seconds: float = DEFAULT_BACKOFF_BASE_SECONDS,
                     backoff_max_seconds: float = DEFAULT_BACKOFF_MAX_SECONDS,
                     validate: Validator | None = None) -> Callable[[Handler], Handler]:
    """Decorator: ``fn`` handles jobs of ``kind`` (see ``add``); bad settings raise
    ValueError at once."""
    _check(kind, max_attempts, backoff_base_seconds, backoff_max_seconds)

    def decorate(fn: Handler) -> Handler:
        add(HandlerSpec(kind, fn, max_attempts, backoff_base_seconds, backoff_max_seconds,
                        validate))
        return fn

    return decorate


def _check(kind: str, max_attempts: int | None, backoff_base_seconds: float,
           backoff_max_seconds: float) -> None:
    if not valid_kind(kind):
        raise ValueError(f"job kind {kind!r} must be dotted lowercase words, "
                         "e.g. 'certificates.issue'")
    if max_attempts is not None and max_attempts < 1:
        raise ValueError("max_attempts must be at least 1")
    if not 0 < backoff_base_seconds <= backoff_max_seconds:
        raise ValueError("need 0 < backoff_base_seconds <= backoff_max_seconds")


def add(spec: HandlerSpec) -> None:
    """Register ``spec.fn`` for jobs of ``spec.kind``. Registering a kind twice with two
    different functions is an error (two modules would fight over it)."""
    _check(spec.kind, spec.max_attempts, spec.backoff_base_seconds, spec.backoff_max_seconds)
    with _lock:
        existing = _handlers.get(spec.kind)
        if existing is not None and _qualname(existing.fn) != _qualname(spec.fn):
            raise ValueError(f"job kind {spec.kind!r} is already handled by "
                             f"{_qualname(existing.fn)}")
        _handlers[spec.kind] = spec


def _qualname(fn: Callable[..., Any]) -> str:
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"


def get_handler(kind: str) -> HandlerSpec | None:
    with _lock:
        return _handlers.get(kind)


def registered_kinds() -> list[str]:
    with _lock:
        return sorted(_handlers)


def load_modules(names: tuple[str, ...] | list[str] = ()) -> list[str]:
    """Import each module of ``names`` (``CAP_EXTRA_HANDLER_MODULES``), which registers
    its kinds; return every kind registered. An import error stops the worker at start,
    naming the module."""
    for name in names:
        if name in _loaded:
            continue
        try:
            importlib.import_module(name)
        except Exception as exc:
            raise RuntimeError(f"cannot import job handler module {name!r}: "
                               f"{exc.__class__.__name__}: {exc}") from exc
        _loaded.append(name)
    kinds = registered_kinds()
    log.debug("job handlers loaded", extra={"kinds": kinds})
    return kinds
