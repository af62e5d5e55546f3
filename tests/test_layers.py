"""README's layering, enforced: imports point down only, the modules of the library form
no import cycle, and no module reaches into another module's private attributes.

Every module of the package must be listed here; a new module fails this test until its
layer is decided. Imports are read from the source: every `import` statement, wherever it
stands (`if TYPE_CHECKING:` blocks and function bodies too), and every string constant that
names a module (what `importlib.import_module` or a worker's `--import` would load).
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from functools import cache
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
    "optimizers": "nn",
    "codec": "codec",
    "messages": "messages",
    "tracing": "tracing",
    "tracing.breakdown": "tracing",
    "tracing.clock": "tracing",
    "tracing.cpu": "tracing",
    "tracing.spans": "tracing",
    "tracing.timeline": "tracing",
    "tracing.picture": "tracing",
    "tracing.picture.scene": "tracing",
    "tracing.picture.render": "tracing",
    "transport": "transport",
    "transport.resp": "transport",
    "transport.cluster": "transport",
    "transport.slots": "transport",
    "transport.connections": "transport",
    "transport.heartbeats": "transport",
    "transport.keys": "transport",
    "transport.reader": "transport",
    "transport.writer": "transport",
    "transport.data": "transport",
    "transport.data.fetch": "transport",
    "transport.data.held": "transport",
    "transport.data.memory": "transport",
    "transport.data.plane": "transport",
    "transport.data.protocol": "transport",
    "transport.data.pushed": "transport",
    "transport.data.reference": "transport",
    "transport.data.server": "transport",
    # The parts of an agent; the agent (rpc.agent) composes them with dist_autograd's.
    "rpc.calls": "rpc",
    "rpc.current": "rpc",
    "rpc.exposed": "rpc",
    "rpc.lifecycle": "rpc",
    "rpc.liveness": "rpc",
    "rpc.references": "rpc",
    "rpc.rref": "rpc",
    "rpc.seam": "rpc",
    "rpc.server": "rpc",
    "rpc.traces": "rpc",
    "rpc.wire": "rpc",
    "dist_autograd": "dist_autograd",
    "dist_autograd.context": "dist_autograd",
    "dist_autograd.contexts": "dist_autograd",
    "dist_autograd.functions": "dist_autograd",
    "dist_autograd.nodes": "dist_autograd",
    "dist_autograd.optimizer": "dist_autograd",
    "dist_autograd.passes": "dist_autograd",
    "rpc": "agent",
    "rpc.agent": "agent",
    "optim": "agent",
    "workloads": "workloads",
    "workloads.demo": "workloads",
    "workloads.echo": "workloads",
    "workloads.param_server": "workloads",
    "workloads.pipeline": "workloads",
    "workloads.soak": "workloads",
    "embedded": "embedded",
    "simulated_hosts": "hosts",
    "worker": "app",
    "status": "app",
    "bench": "app",
    "bench.local": "app",
    "local_cluster": "app",
    "job": "app",
    "tracefile": "app",
    "bench.options": "app",
    "bench.rpc": "app",
    "bench.autograd": "app",
    "bench.driver": "app",
    "bench.scale": "app",
    "bench.soak": "app",
    "bench.suite": "app",
    "bench.report": "app",
    "bench.torch_side": "app",
    "bench.records": "app",
    "bench.redis_memory": "app",
    "bench.raw_tcp": "app",
    "bench.hosts": "app",
    "bench.inline_limit": "app",
    "cli": "app",
    "startup": "app",
    "__main__": "app",
    "__init__": "app",
}

_BELOW_AGENT = {"errors", "tensor", "nn", "codec", "messages", "tracing", "transport", "rpc"}
# layer -> the asyncgrad layers it may import
ALLOWED = {
    "errors": set(),
    "tensor": {"errors", "tensor"},
    "nn": {"errors", "tensor", "nn"},
    "codec": {"errors", "codec"},
    "messages": {"errors", "messages"},
    # Spans and their timeline: recorded by every layer above, knowing none of them.
    "tracing": {"errors", "tracing"},
    "transport": {"errors", "tracing", "transport"},
    # rpc carries tensors (and parameters) as values, but never touches the graph.
    "rpc": {"errors", "codec", "messages", "tracing", "transport", "tensor", "nn", "rpc"},
    # dist_autograd sees the agent only through rpc's parts (rpc.current): the agent
    # imports dist_autograd to build its part.
    "dist_autograd": _BELOW_AGENT | {"dist_autograd"},
    "agent": _BELOW_AGENT | {"dist_autograd", "agent"},
    "workloads": _BELOW_AGENT | {"dist_autograd", "agent", "workloads"},
    "embedded": {"errors", "embedded"},
    "hosts": {"errors", "embedded", "hosts"},
    "app": set(LAYER_OF.values()),
}

# layer -> third-party or stdlib packages it must not touch
FORBIDDEN = {
    "errors": {"asyncio", "redis", "hiredis", "msgpack", "numpy"},
    "tensor": {"asyncio", "redis", "hiredis", "msgpack", "pickle"},
    "nn": {"asyncio", "redis", "hiredis", "msgpack", "pickle"},
    "codec": {"asyncio", "redis", "hiredis", "pickle"},
    "messages": {"asyncio", "redis", "hiredis", "msgpack", "numpy", "pickle"},
    "tracing": {"asyncio", "redis", "hiredis", "msgpack", "pickle"},
    "transport": {"numpy", "msgpack", "pickle"},
    "rpc": {"redis", "hiredis", "msgpack", "pickle"},
    "dist_autograd": {"redis", "hiredis", "msgpack", "pickle"},
    "agent": {"redis", "hiredis", "msgpack", "pickle"},
    "workloads": {"redis", "hiredis", "msgpack", "pickle"},
    "embedded": {"numpy", "msgpack", "pickle"},
    "hosts": {"asyncio", "redis", "hiredis", "numpy", "msgpack", "pickle"},
    "app": {"pickle"},
}

# A string constant that names a module of ours, or a `module:attribute` in one.
_MODULE_STRING = re.compile(r"(asyncgrad|workers)(\.[A-Za-z_]\w*)+(:[\w.]+)?")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts.pop()
    return ".".join(parts)


def modules() -> Iterator[tuple[str, Path]]:
    for path in sorted(PACKAGE.rglob("*.py")):
        yield module_name(path), path


@cache
def tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text())


def _absolute(module: str, path: Path, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    base = ["asyncgrad", *package[: len(package) - node.level + 1]]
    return ".".join(base + ([node.module] if node.module else []))


def imports(module: str, path: Path) -> set[str]:
    """Every module `module` imports, in any block, or names in a string."""
    ours = {f"asyncgrad.{m}" if m != "__init__" else "asyncgrad" for m, _ in modules()}
    found = set()
    for node in ast.walk(tree(path)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(module, path, node)
            # `from package import submodule` imports the submodule, not the package's names.
            subs = {f"{base}.{alias.name}" for alias in node.names} & ours
            found.update(subs or {base})
        elif isinstance(node, ast.Constant) and _MODULE_STRING.fullmatch(str(node.value)):
            found.add(str(node.value).partition(":")[0])
    return found


def layer_of_import(name: str) -> str | None:
    parts = name.split(".")[1:]
    while parts:
        if ".".join(parts) in LAYER_OF:
            return LAYER_OF[".".join(parts)]
        parts.pop()
    return None


def test_every_module_has_a_layer() -> None:
    assert {m for m, _ in modules()} - set(LAYER_OF) == set(), "add new modules to LAYER_OF"


def test_imports_point_down() -> None:
    violations = []
    for module, path in modules():
        layer = LAYER_OF[module]
        for name in imports(module, path):
            top = name.split(".")[0]
            if top == "workers":
                violations.append(f"{module} imports {name}: the library never loads workers/")
            elif top == "asyncgrad":
                target = layer_of_import(name)
                if target is not None and target not in ALLOWED[layer]:
                    violations.append(f"{module} ({layer}) imports {name} ({target})")
            elif top in FORBIDDEN[layer]:
                violations.append(f"{module} ({layer}) imports {name}")
    assert violations == []


def _graph() -> dict[str, set[str]]:
    """module -> the modules of ours it imports (the nearest listed module of each name)."""
    graph: dict[str, set[str]] = {}
    for module, path in modules():
        edges = set()
        for name in imports(module, path):
            parts = name.split(".")[1:] if name.startswith("asyncgrad.") else []
            while parts and ".".join(parts) not in LAYER_OF:
                parts.pop()
            if parts and ".".join(parts) != module:
                edges.add(".".join(parts))
        graph[module] = edges
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The cycles found by a depth-first walk (empty when the graph is acyclic)."""
    found: list[list[str]] = []
    state: dict[str, int] = {}  # 1 on the current path, 2 finished
    path: list[str] = []

    def walk(node: str) -> None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                found.append([*path[path.index(nxt) :], nxt])
            elif nxt not in state:
                walk(nxt)
        path.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            walk(node)
    return found


def test_no_import_cycles() -> None:
    # Type-only imports count: the arrows a reader follows must form a tree (a DAG).
    assert cycles(_graph()) == []


def test_rpc_imports_only_what_the_transport_exports() -> None:
    rpc = [(m, p) for m, p in modules() if LAYER_OF[m] in ("rpc", "agent")]
    reached = {name for m, p in rpc for name in imports(m, p) if name.startswith("asyncgrad.")}
    assert {n for n in reached if n.startswith("asyncgrad.transport.")} == set()


def _private_names_defined(module_tree: ast.Module) -> set[str]:
    names = set()
    for node in ast.walk(module_tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            names.add(node.attr)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            names.add(node.value)  # __slots__ entries
    return {n for n in names if n.startswith("_")}


def private_reaches(module_tree: ast.Module) -> list[str]:
    """`x._name` where `x` is not self or cls and `_name` is not one this module defines."""
    own = _private_names_defined(module_tree)
    found = []
    for node in ast.walk(module_tree):
        if not isinstance(node, ast.Attribute) or not node.attr.startswith("_"):
            continue
        if node.attr.startswith("__") and node.attr.endswith("__"):
            continue
        owner = node.value
        if isinstance(owner, ast.Name) and owner.id in ("self", "cls"):
            continue
        if node.attr not in own:
            found.append(f"line {node.lineno}: {ast.unparse(node)}")
    return found


def test_no_module_reaches_into_another_modules_privates() -> None:
    violations = {
        module: reaches for module, path in modules() if (reaches := private_reaches(tree(path)))
    }
    assert violations == {}


def test_checkers_see_violations() -> None:
    # Each rule must be able to fail.
    assert layer_of_import("asyncgrad.codec") not in ALLOWED["tensor"]
    assert "msgpack" in FORBIDDEN["tensor"]
    assert layer_of_import("asyncgrad.rpc") not in ALLOWED["dist_autograd"]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]
    reaching = ast.parse("def f(agent):\n    return agent._transport\n")
    assert private_reaches(reaching) == ["line 2: agent._transport"]
    own = ast.parse("class A:\n    def _x(self): ...\ndef f(a: A):\n    return a._x()\n")
    assert private_reaches(own) == []
    assert _MODULE_STRING.fullmatch("workers.demo:main")
    assert "asyncgrad.workloads.demo" in imports("job", PACKAGE / "job.py")  # a string
    assert "asyncgrad.rpc.wire" in imports(
        "dist_autograd.passes", PACKAGE / "dist_autograd" / "passes.py"
    )  # under TYPE_CHECKING
