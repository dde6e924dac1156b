"""Benchmarks. Each runs its baseline in the same process run and prints one JSON object last."""
