"""The worker modules asyncgrad itself runs: the demo (`asyncgrad demo`), the benchmark
workloads (`asyncgrad bench`) and the soak's trainers. A worker loads one with
`asyncgrad worker NAME --import asyncgrad.workloads.MODULE`; importing it exposes its
functions and classes.
"""
