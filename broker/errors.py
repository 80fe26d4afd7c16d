"""One error hierarchy for everything that crosses NATS."""


class ParallaxError(Exception):
    """Base class of every Parallax-NATS error."""


class WireError(ParallaxError):
    """A message on the wire is malformed (bad header, dtype, shape or chunking)."""


class ChainUnavailable(ParallaxError):
    """No full chain of stages covers the model's layers."""

    def __init__(self, model: str, missing: list[tuple[int, int]]):
        self.model = model
        self.missing = missing
        ranges = ", ".join(f"{a}:{b}" for a, b in missing) or "unknown"
        super().__init__(f"no stage serves layers {ranges} of model '{model}'")


class StageFailed(ParallaxError):
    """A stage reported an error for a request, or vanished while serving it."""
