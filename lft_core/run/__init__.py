"""Orchestration: the command line (``cli``), background jobs (``jobs``), the demo (``demo``), sweeps
(``sweep``), benchmarks (``bench``) and the measured durations that feed progress estimates (``timings``)."""
