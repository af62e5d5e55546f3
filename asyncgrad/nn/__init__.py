"""Neural network building blocks, named as in `torch.nn`."""

from __future__ import annotations

from asyncgrad.nn import functional
from asyncgrad.nn.modules import Linear, Module, Parameter, ReLU, Sequential, Tanh

__all__ = ["Linear", "Module", "Parameter", "ReLU", "Sequential", "Tanh", "functional"]
