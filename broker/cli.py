"""What every Parallax command does around its async main: logging and one-line errors."""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Coroutine

from .errors import ParallaxError


def run_command(prog: str, main: Coroutine, nats_url: str, log_level: str = "INFO") -> None:
    """Run ``main``; bad input or an unreachable NATS server ends with one line on stderr, exit 2."""
    from nats.errors import Error as NatsError

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        asyncio.run(main)
    except (ParallaxError, ValueError, OSError) as e:
        _fail(prog, str(e))
    except NatsError as e:
        _fail(prog, f"cannot reach NATS at {nats_url}: {e}")
    except KeyboardInterrupt:
        pass


def _fail(prog: str, message: str) -> None:
    print(f"{prog}: error: {message}", file=sys.stderr)
    sys.exit(2)
