"""Job kinds and their handlers.

``HANDLER_MODULES`` lists every module that registers handlers with
``@register_handler``; the worker imports them all at start. Add yours here.
"""

from __future__ import annotations

HANDLER_MODULES: list[str] = [
]
