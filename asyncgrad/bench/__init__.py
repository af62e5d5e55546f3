"""`asyncgrad bench`: the workloads of docs/BENCH.md (suite.py runs them).

Kept empty, so the CLI can import bench/options.py to build its parser without loading
the workloads.
"""
