"""docker/ stays in step with the code: every compose command is a real CLI command, every
module it imports exists, and the image copies what the package needs.

No Docker engine runs here (nor in CI), so the image itself is not built by the tests.
"""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path
from typing import Any

import pytest
import yaml

from asyncgrad.cli import _parser

DOCKER = Path(__file__).resolve().parent.parent / "docker"


def services() -> dict[str, dict[str, Any]]:
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    return {name: s for name, s in compose["services"].items() if "build" in s}


def test_compose_has_the_main_job() -> None:
    assert {"ps", "trainer1", "trainer2", "job"} <= set(services())


@pytest.mark.parametrize("name", sorted(services()))
def test_every_command_parses_and_its_modules_exist(name: str) -> None:
    command = services()[name]["command"]
    args = _parser().parse_args(command)  # SystemExit (exit 2) on anything unknown
    for module in getattr(args, "imports", []):
        assert importlib.util.find_spec(module) is not None, f"{name}: no module {module}"
    if command[0] == "run":
        module, _, function = args.job.partition(":")
        assert callable(getattr(importlib.import_module(module), function))


def test_dockerfile_copies_what_the_package_needs() -> None:
    copied = {
        part
        for line in (DOCKER / "Dockerfile").read_text().splitlines()
        if line.startswith("COPY ")
        for part in line.split()[1:-1]
    }
    assert {"pyproject.toml", "README.md", "asyncgrad", "workers"} <= copied
    root = DOCKER.parent
    assert all((root / path).exists() for path in copied)
