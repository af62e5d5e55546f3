"""DESIGN.md's layering, enforced: imports point down only.

Every module of the package must be listed here; a new module fails this test until its
layer is decided.
"""

from __future__ import annotations

import ast
from pathlib import Path

import asyncgrad

PACKAGE = Path(asyncgrad.__file__).parent

# module (dotted, relative to asyncgrad) -> layer
LAYER_OF = {
    "errors": "errors",
    "graph": "tensor",
    "ops": "tensor",
    "tensor": "tensor",
    "nn": "nn",
    "nn.functional": "nn",
    "nn.modules": "nn",
    "optim": "nn",
    "codec": "codec",
    "resp": "transport",
    "transport": "transport",
    "transport.cluster": "transport",
    "transport.slots": "transport",
    "transport.connections": "transport",
    "transport.heartbeats": "transport",
    "transport.keys": "transport",
    "transport.reader": "transport",
    "transport.writer": "transport",
    "rpc": "rpc",
    "rpc.agent": "rpc",
    "rpc.calls": "rpc",
    "rpc.exposed": "rpc",
    "rpc.liveness": "rpc",
    "rpc.messages": "rpc",
    "rpc.references": "rpc",
    "rpc.rref": "rpc",
    "rpc.seam": "rpc",
    "rpc.server": "rpc",
    "dist_autograd": "dist_autograd",
    "dist_autograd.passes": "dist_autograd",
    "dist_autograd.context": "dist_autograd",
    "dist_autograd.nodes": "dist_autograd",
    "dist_autograd.optimizer": "dist_autograd",
    "embedded": "embedded",
    "worker": "app",
    "status": "app",
    "bench": "app",
    "bench.local": "app",
    "local_cluster": "app",
    "job": "app",
    "bench.options": "app",
    "bench.rpc": "app",
    "bench.autograd": "app",
    "bench.driver": "app",
    "bench.scale": "app",
    "bench.soak": "app",
    "cli": "app",
    "__main__": "app",
    "__init__": "app",
}

# layer -> the asyncgrad layers it may import
ALLOWED = {
    "errors": set(),
    "tensor": {"errors", "tensor"},
    "nn": {"errors", "tensor", "nn"},
    "codec": {"errors", "codec"},
    "transport": {"errors", "transport"},
    # rpc carries tensors (and parameters) as values, but never touches the graph.
    "rpc": {"errors", "codec", "transport", "tensor", "nn", "rpc"},
    "dist_autograd": {"errors", "tensor", "nn", "rpc", "dist_autograd"},
    "embedded": {"errors", "embedded"},
    "app": set(LAYER_OF.values()),
}

# layer -> third-party or stdlib packages it must not touch
FORBIDDEN = {
    "errors": {"asyncio", "redis", "hiredis", "msgpack", "numpy"},
    "tensor": {"asyncio", "redis", "hiredis", "msgpack", "pickle"},
    "nn": {"asyncio", "redis", "hiredis", "msgpack", "pickle"},
    "codec": {"asyncio", "redis", "hiredis", "pickle"},
    "transport": {"numpy", "msgpack", "pickle"},
    "rpc": {"redis", "hiredis", "msgpack", "pickle"},
    "dist_autograd": {"redis", "hiredis", "msgpack", "pickle"},
    "embedded": {"numpy", "msgpack", "pickle"},
    "app": {"pickle"},
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts.pop()
    return ".".join(parts)


def imports(path: Path) -> set[str]:
    """What a module imports at run time (`if TYPE_CHECKING:` blocks are for types only)."""
    found = set()
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            node.body = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            # (a relative import stays inside its subpackage: the same layer)
            found.add(node.module)
            if node.module == "asyncgrad":
                found.update(f"asyncgrad.{alias.name}" for alias in node.names)
    return found


def layer_of_import(name: str) -> str | None:
    parts = name.split(".")[1:]
    while parts:
        if ".".join(parts) in LAYER_OF:
            return LAYER_OF[".".join(parts)]
        parts.pop()
    return None


def test_every_module_has_a_layer() -> None:
    modules = {module_name(p) for p in PACKAGE.rglob("*.py")}
    assert modules - set(LAYER_OF) == set(), "add new modules to LAYER_OF"


def test_imports_point_down() -> None:
    violations = []
    for path in PACKAGE.rglob("*.py"):
        layer = LAYER_OF[module_name(path)]
        for name in imports(path):
            top = name.split(".")[0]
            if top == "asyncgrad":
                target = layer_of_import(name)
                if target is not None and target not in ALLOWED[layer]:
                    violations.append(f"{module_name(path)} ({layer}) imports {name} ({target})")
            elif top in FORBIDDEN[layer]:
                violations.append(f"{module_name(path)} ({layer}) imports {name}")
    assert violations == []


def test_checker_sees_a_violation() -> None:
    # The rule must be able to fail: a tensor-layer module importing the codec is caught.
    assert layer_of_import("asyncgrad.codec") not in ALLOWED["tensor"]
    assert "msgpack" in FORBIDDEN["tensor"]
