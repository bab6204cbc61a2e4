"""Benchmark scripts, run from the repository root as ``python -m benchmarks.<name>`` (not installed with
the package; ``benchmarks/README.md`` lists them and their latest measurements)."""
