"""Benchmarks for Parallax-NATS. ``python -m bench.serve`` measures the serving path end to end."""
