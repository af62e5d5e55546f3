# examples/rpc_basics.py: what worker1 exposes; the driver imports the same module
from asyncgrad import rpc


@rpc.expose  # callable remotely as "examples.rpc_basics:scale"
def scale(x, factor=2.0):
    return x * factor


@rpc.expose(name="ps.Counter")  # classes too: remote() makes an instance on the worker
class Counter:
    def __init__(self, start):
        self.n = start

    def add(self, k):
        self.n += k
        return self.n
