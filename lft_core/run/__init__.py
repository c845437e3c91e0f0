"""Orchestration: the command line (``cli``, ``commands``), background jobs (``jobs``), the demo (``demo``),
sweeps (``sweep``: the grid and its plan; ``sweep_run``: running it), benchmarks (``bench``) and the measured
durations that feed progress estimates (``timings``)."""
