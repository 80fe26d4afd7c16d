"""Parallax-NATS: pipeline-parallel LLM inference over NATS."""

__version__ = "0.1.0"
