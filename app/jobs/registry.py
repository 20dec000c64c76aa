"""Job kinds and their handlers.

``HANDLER_MODULES`` lists every module that registers handlers with
``@register_handler``; the worker imports them all at start. Add yours here.

A handler is ``def handle(ctx: JobContext) -> dict | None``; its return value is stored
as the job's ``result``. Per kind it may set ``max_attempts`` (default
``CAP_JOB_MAX_ATTEMPTS``), the exponential backoff between failed attempts
(``backoff_base_seconds`` doubling up to ``backoff_max_seconds``, with jitter) and a
``validate(payload)`` that raises ``ValueError`` for a payload it cannot run (the job
then goes ``dead`` with that message, without calling the handler).

``CAP_EXTRA_HANDLER_MODULES`` (comma-separated module names) adds modules at start: a
hook for tests, benchmarks and operators' own job kinds, not needed in production.
"""

from __future__ import annotations

import importlib
import logging
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from app.jobs.context import JobContext

log = logging.getLogger(__name__)

HANDLER_MODULES: list[str] = [
    "app.jobs.handlers",
    "app.acme.handlers",  # certificates.issue, certificates.renewal_scan
    "app.keys.handlers",  # kek.rotation_step
    "app.audit.jobs",  # audit.forward
    "app.ops.handlers",  # certificates.drift_scan / verify_served, alerts.evaluate / deliver
]

Handler = Callable[["JobContext"], "dict[str, Any] | None"]
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
    """Decorator: ``fn`` handles jobs of ``kind``. Registering a kind twice with two
    different functions is an error (two modules would fight over it)."""
    if not valid_kind(kind):
        raise ValueError(f"job kind {kind!r} must be dotted lowercase words, "
                         "e.g. 'certificates.issue'")
    if max_attempts is not None and max_attempts < 1:
        raise ValueError("max_attempts must be at least 1")
    if not 0 < backoff_base_seconds <= backoff_max_seconds:
        raise ValueError("need 0 < backoff_base_seconds <= backoff_max_seconds")

    def decorate(fn: Handler) -> Handler:
        spec = HandlerSpec(kind, fn, max_attempts, backoff_base_seconds, backoff_max_seconds,
                           validate)
        with _lock:
            existing = _handlers.get(kind)
            if existing is not None and _qualname(existing.fn) != _qualname(fn):
                raise ValueError(f"job kind {kind!r} is already handled by "
                                 f"{_qualname(existing.fn)}")
            _handlers[kind] = spec
        return fn

    return decorate


def _qualname(fn: Callable[..., Any]) -> str:
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"


def get_handler(kind: str) -> HandlerSpec | None:
    with _lock:
        return _handlers.get(kind)


def registered_kinds() -> list[str]:
    with _lock:
        return sorted(_handlers)


def load_handlers(extra: tuple[str, ...] | list[str] = ()) -> list[str]:
    """Import every handler module (``HANDLER_MODULES`` then ``extra``); return the
    kinds registered. An import error stops the worker at start, naming the module."""
    for name in [*HANDLER_MODULES, *extra]:
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
