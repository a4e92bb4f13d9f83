"""Speed and memory benchmarks, reported as ratios against baselines run in the same process.

Run one with ``python -m benchmarks.<name> [--json PATH] [--device DEVICE]``.
"""
