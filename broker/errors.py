"""The one error hierarchy of Parallax-NATS, and the exit codes every command uses.

Exit codes (every CLI): 0 clean stop; 1 something failed while running (:class:`ParallaxError`);
2 the command could not start: bad input, an unknown model, an unreachable NATS server
(:class:`UsageError` and its subclasses; argparse's own errors are 2 as well).
"""

from __future__ import annotations

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


class ParallaxError(Exception):
    """Base class of every Parallax-NATS error."""

    exit_code = EXIT_FAILED


class UsageError(ParallaxError):
    """The command cannot start as asked: bad flags, a model that is not there, no NATS server."""

    exit_code = EXIT_USAGE


# --- input and environment (exit code 2) ---------------------------------------------------------
class ModelNotFound(UsageError):
    """A model name, path or HF id does not point at usable local weights."""


class GatedModel(ModelNotFound):
    """A Hub model needs an access token (HF_TOKEN) that was not given or has no access."""


class HubUnreachable(ModelNotFound):
    """The Hugging Face Hub (HF_ENDPOINT) cannot be reached, or is switched off (HF_HUB_OFFLINE), and
    the files are not in the local cache."""


class UnsupportedModel(UsageError):
    """The model's architecture has no implementation here."""


class NatsUnreachable(UsageError):
    """The NATS server could not be reached when starting."""


class NoJetStream(UsageError):
    """The NATS server runs without JetStream, so there is no registry."""


class NatsServerError(UsageError):
    """The nats-server binary is missing, or the embedded server failed to start."""


# --- the wire and the pipeline -------------------------------------------------------------------
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


class HopLost(StageFailed):
    """A stage on a request's route died, left its range or went silent: the gateway resumes the
    request on live replicas (it only reaches a client when no replica comes back in time)."""


class RequestCancelled(ParallaxError):
    """A running request was ended on purpose (``POST /v1/requests/{id}/abort``): its KV is released."""


class RequestTimedOut(RequestCancelled):
    """A request ran past its deadline (the ``timeout`` of its body or the gateway's default)."""


class GrammarError(ParallaxError):
    """A structured-output grammar (JSON schema, regex, choice, tool call) that cannot be compiled or
    that a token breaks: the request is refused, with the reason, not served unconstrained."""


class Retry(ParallaxError):
    """A stage handed a request back for a reason that resubmitting fixes (preempted, prefix miss)."""

    def __init__(self, message: str, code: str):
        super().__init__(message)
        self.code = code


# --- the registry and placement ------------------------------------------------------------------
class RegistryError(ParallaxError):
    """The cluster registry (JetStream KV) could not be read."""


class Unplaceable(ParallaxError):
    """The nodes' memory cannot serve every layer even once."""
