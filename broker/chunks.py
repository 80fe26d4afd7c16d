"""Split payloads above the server's ``max_payload`` into numbered chunks and join them again.

A chunked message carries NATS headers ``Px-Id`` (unique per message) and ``Px-Part`` (``i/n``).
NATS keeps the order of one publisher's messages on one subject, so chunks arrive in order. A
message that stops arriving (a part lost) is dropped once idle for ``max_age_s``.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field

from .errors import WireError
from .wire import Message, decode

HEADER_ROOM = 4096  # bytes kept free for NATS headers; the server counts them in max_payload
ID, PART = "Px-Id", "Px-Part"


def chunk_limit(max_payload: int) -> int:
    return max(1024, max_payload - HEADER_ROOM)


async def publish(nc, subject: str, payload: bytes, headers: dict[str, str] | None = None) -> None:
    """Publish ``payload``, split into chunks when it is larger than the server allows; ``headers``
    go with every chunk."""
    limit = chunk_limit(nc.max_payload)
    if len(payload) <= limit:
        await nc.publish(subject, payload, headers=headers or None)
        return
    msg_id, parts = uuid.uuid4().hex, (len(payload) + limit - 1) // limit
    view = memoryview(payload)
    for i in range(parts):
        piece = bytes(view[i * limit : (i + 1) * limit])
        await nc.publish(subject, piece, headers=(headers or {}) | {ID: msg_id, PART: f"{i}/{parts}"})


@dataclass
class _Partial:
    total: int
    parts: list[bytes] = field(default_factory=list)
    size: int = 0
    seen: float = 0.0  # time.monotonic() when its last part came


class Reassembler:
    """Collects chunks per message id; whole messages pass straight through."""

    def __init__(self, max_age_s: float = 30.0, max_bytes: int = 1 << 30):
        self._parts: dict[str, _Partial] = {}
        self.max_age_s = max_age_s
        self.max_bytes = max_bytes

    @property
    def pending(self) -> int:
        """Messages partly received."""
        return len(self._parts)

    def feed(self, data: bytes, headers: dict[str, str] | None) -> bytes | None:
        """Returns the whole payload once complete, else None. Raises WireError on bad chunks; a
        message with a bad chunk is forgotten."""
        if self._parts:
            self._expire()
        if not headers or ID not in headers:
            return data
        msg_id = headers[ID]
        partial = self._parts.pop(msg_id, None)
        index, total = _part(headers.get(PART, ""))
        partial = partial or _Partial(total)
        if index != len(partial.parts) or total != partial.total:
            raise WireError(f"chunk {index}/{total} of {msg_id} arrived out of order "
                            f"(expected {len(partial.parts)}/{partial.total})")
        partial.parts.append(data)
        partial.size += len(data)
        if partial.size > self.max_bytes:
            raise WireError(f"chunked message {msg_id} is larger than {self.max_bytes} bytes")
        if len(partial.parts) < total:
            partial.seen = time.monotonic()
            self._parts[msg_id] = partial
            return None
        return b"".join(partial.parts)

    def receive(self, data: bytes, headers: dict[str, str] | None) -> tuple[Message, memoryview] | None:
        """:meth:`feed`, then :func:`~parallax.broker.wire.decode` the message once it is whole.
        Raises WireError on a bad chunk or a malformed message."""
        payload = self.feed(data, headers)
        return None if payload is None else decode(payload)

    def _expire(self) -> None:
        now = time.monotonic()
        for key in [k for k, p in self._parts.items() if now - p.seen > self.max_age_s]:
            del self._parts[key]


def _part(value: str) -> tuple[int, int]:
    try:
        index, total = (int(x) for x in value.split("/"))
    except ValueError:
        raise WireError(f"bad {PART} header {value!r}") from None
    if not 0 <= index < total:
        raise WireError(f"bad {PART} header {value!r}")
    return index, total
