"""What every Parallax command does around its async main: logging and one-line errors."""

from __future__ import annotations

import asyncio
import logging
import re
import sys
from collections.abc import Coroutine

from .errors import EXIT_USAGE, NatsUnreachable, ParallaxError


def run_command(prog: str, main: Coroutine, nats_url: str, log_level: str = "INFO") -> None:
    """Run ``main``; an error ends with one line on stderr and the exit code of :mod:`.errors`."""
    from nats.errors import Error as NatsError

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        asyncio.run(main)
    except (ParallaxError, ValueError, OSError) as e:
        sys.exit(fail(prog, e))
    except NatsError as e:
        sys.exit(fail(prog, NatsUnreachable(f"cannot reach NATS at {nats_url}: {e}")))
    except KeyboardInterrupt:
        pass


def fail(prog: str, error: Exception) -> int:
    """Print ``error`` as one line and return its exit code: a ParallaxError's own; bad values
    (``ValueError``) and OS refusals (a port in use, a missing file) are input errors."""
    print(f"{prog}: error: {error}", file=sys.stderr)
    return error.exit_code if isinstance(error, ParallaxError) else EXIT_USAGE


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}


def parse_size(text: str) -> int:
    """``"8GiB"``, ``"512MiB"``, ``"300KB"``, ``"1.5"`` (a bare number is GiB) -> bytes."""
    match = _SIZE.match(text) if isinstance(text, str) else None
    if match is None:
        raise ValueError(f"size must look like 8GiB, 512MiB, 300KiB or a number of GiB, got {text!r}")
    value, unit = float(match.group(1)), (match.group(2) or "gib").lower()
    size = int(value * _UNITS[unit])
    if size <= 0:
        raise ValueError(f"size {text!r} must be positive")
    return size
