"""Applications built on the core: analysis, FLOPs, benchmarks, evaluation, demo, calibration, CLI."""
