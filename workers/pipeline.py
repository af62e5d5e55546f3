"""A pipeline stage: `asyncgrad worker stage1 --import workers.pipeline`.

Exposes `Stage` ("pipeline.Stage"): one tanh layer of a model split across workers
(see asyncgrad/workloads/pipeline.py).
"""

from asyncgrad.workloads.pipeline import Stage

__all__ = ["Stage"]
