"""Benchmarks: the `auraflow-edge bench` harness and the standalone measurement scripts."""
