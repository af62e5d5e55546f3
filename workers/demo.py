"""The demo's trainers and job: `asyncgrad worker trainer1 --import workers.demo`, and
`asyncgrad run workers.demo:main` for the job (see asyncgrad/workloads/demo.py).
"""

from asyncgrad.workloads.demo import Trainer, main

__all__ = ["Trainer", "main"]
