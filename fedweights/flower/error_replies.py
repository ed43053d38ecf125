"""What a node's error reply says, made readable for ``metrics.json`` and the terminal.

Flower reports a ClientApp that raised as ``"<class 'ValueError'>:<'message'>"``; in simulation the
exception is Ray's, whose message is the whole remote traceback (with terminal colour codes), so a
round's ``failures`` held 2 KB of traceback ending in a Ray wrapper. ``failure_from_error`` keeps
the original exception's ``Type: message`` as the reason and the traceback next to it.
"""

from __future__ import annotations

import re

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_FLOWER_FORMAT = re.compile(r"<class '(?P<type>[^']+)'>:<'(?P<message>.*)'>", re.DOTALL)
_EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*: .+$", re.MULTILINE)  # "ValueError: ...", unindented
_TRACEBACK_MARK = '\n  File "'


def failure_from_error(node: str, reason: str) -> dict[str, str]:
    """``{"node", "reason"}`` for an error reply: ``Type: message`` of the exception the ClientApp
    raised (the first one of a chained traceback, its root cause), plus ``"traceback"`` when the
    reason carried one; other reasons are kept as they are (colour codes removed)."""
    text = _ANSI.sub("", reason)
    parsed = _FLOWER_FORMAT.fullmatch(text.strip())
    if parsed is None:
        return {"node": node, "reason": text}
    kind, message = parsed["type"], parsed["message"]
    if _TRACEBACK_MARK not in message:
        return {"node": node, "reason": f"{kind}: {message}"}
    root = _EXCEPTION_LINE.search(message)
    summary = root.group(0) if root else message.strip().splitlines()[-1]
    return {"node": node, "reason": summary, "traceback": message.strip()}
