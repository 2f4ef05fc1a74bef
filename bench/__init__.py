"""Benchmarks against the peers (issue 5): scripts, not tests. See README "Performance"."""
