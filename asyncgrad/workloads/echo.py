"""The benchmark functions (B1-B3): echo returns its argument unchanged."""

from __future__ import annotations

from typing import Any

from asyncgrad import rpc


@rpc.expose(name="echo")
def echo(value: Any) -> Any:
    """Return `value` as received: a round trip through both inboxes."""
    return value
