"""Benchmarks: `python -m benchmarks` (README, "Benchmarks"); speed targets live here only."""
