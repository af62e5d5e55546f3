"""README stays true to the code: its layout names every module, and the sizes it gives
for the Redis client are the files' (within 10%)."""

from __future__ import annotations

import re
from pathlib import Path

import asyncgrad

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = Path(asyncgrad.__file__).parent
README = (ROOT / "README.md").read_text()


def _section(title: str) -> str:
    start = README.index(f"## {title}\n")
    end = README.find("\n## ", start + 1)
    return README[start : end if end > 0 else None]


def test_the_layout_names_every_module() -> None:
    layout = _section("Layout")
    names = {p.stem for p in PACKAGE.glob("*.py") if p.stem not in ("__init__", "__main__")}
    names |= {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").exists()}
    for package in ("transport", "rpc", "dist_autograd", "workloads"):
        names |= {p.stem for p in (PACKAGE / package).glob("*.py") if p.stem != "__init__"}
    missing = {n for n in names if not re.search(rf"\b{n}\b", layout)}
    assert missing == set()


def test_the_client_sizes_are_the_files() -> None:
    claim = _section("How it works")
    for path, stated in re.findall(r"`(transport/\w+\.py)` \(~(\d+)", claim):
        lines = len((PACKAGE / path).read_text().splitlines())
        assert abs(lines - int(stated)) <= 0.1 * lines, (path, lines, stated)
    total = int(re.search(r"It is ~(\d+) lines", claim).group(1))  # type: ignore[union-attr]
    files = ("resp", "cluster", "slots")
    actual = sum(len((PACKAGE / "transport" / f"{f}.py").read_text().splitlines()) for f in files)
    assert abs(actual - total) <= 0.1 * actual
