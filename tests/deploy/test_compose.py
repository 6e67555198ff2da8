"""Compose files validate against the Compose Specification's JSON schema
(vendored in the check-jsonschema wheel, so no network) and say what we mean:
loopback-only ports, a GPU for the GPU worker, on CPU the model its image carries. The
stack itself runs in tests/docker (the Docker tier)."""

from __future__ import annotations

import json
import re
from importlib import resources

import pytest
import yaml
from conftest import DEPLOY

COMPOSE = DEPLOY / "compose"
FILES = ["compose.yaml", "compose.cpu.yaml", "compose.gpu.yaml"]


class Reset:
    """Compose's `!reset` tag: drop whatever the base file set."""


class ComposeLoader(yaml.SafeLoader):
    pass


ComposeLoader.add_constructor("!reset", lambda loader, node: Reset())


def load(name: str) -> dict:
    return yaml.load((COMPOSE / name).read_text(), Loader=ComposeLoader)


def plain(value):
    """The document as the schema sees it (`!reset x` validates as an empty x)."""
    if isinstance(value, Reset):
        return {}
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plain(v) for v in value]
    return value


@pytest.fixture(scope="module")
def validator():
    jsonschema = pytest.importorskip("jsonschema")
    pytest.importorskip("check_jsonschema", reason="check-jsonschema ships the compose schema")
    text = (
        resources.files("check_jsonschema.builtin_schemas.vendor") / "compose-spec.json"
    ).read_text()
    schema = json.loads(text)
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)


@pytest.mark.parametrize("name", FILES)
def test_validates_against_compose_spec(validator, name):
    errors = [e.message for e in validator.iter_errors(plain(load(name)))]
    assert errors == []


def test_schema_rejects_a_broken_file(validator):
    broken = plain(load("compose.yaml"))
    broken["services"]["nats"]["stop_grace_periodd"] = "10s"  # a typo
    broken["services"]["grafana"]["depends_on"] = "prometheus"  # must be a list or map
    messages = " ".join(e.message for e in validator.iter_errors(broken))
    assert "stop_grace_periodd" in messages and "'prometheus' is not valid" in messages


@pytest.mark.parametrize("name", FILES)
def test_published_ports_bind_loopback_only(name):
    for svc in load(name)["services"].values():
        for port in svc.get("ports", []):
            assert isinstance(port, str) and port.startswith("127.0.0.1:"), port


def test_base_stack_has_every_part():
    services = load("compose.yaml")["services"]
    assert {"nats", "context-store", "orchestrator", "prometheus", "grafana"} <= set(services)
    nats = services["nats"]
    assert "-js" in nats["command"] and "-m" in nats["command"]
    assert any(v.endswith(":/data") for v in nats["volumes"])
    assert "BATON_CONTEXT_KEY" in services["context-store"]["environment"]
    # Grafana's image cannot be built without a registry: opt-in only.
    assert services["grafana"]["profiles"] == ["grafana"]


def test_gpu_override_reserves_gpus_and_shared_memory():
    worker = load("compose.gpu.yaml")["services"]["inference-worker"]
    (gpu,) = worker["deploy"]["resources"]["reservations"]["devices"]
    assert "gpu" in gpu["capabilities"] and gpu["driver"] == "nvidia"
    assert worker["shm_size"] and worker["stop_grace_period"] == "120s"
    assert worker["build"]["dockerfile"] == "deploy/docker/Dockerfile.gpu"
    env = worker["environment"]
    # GPU-appropriate: one tensor-parallel rank per reserved GPU, no CPU-demo values.
    assert env["BATON_TENSOR_PARALLEL_SIZE"] == gpu["count"] == "${BATON_GPUS:-1}"
    assert env["BATON_GPU_MEMORY_UTILIZATION"].startswith("${")
    assert "BATON_KV_CACHE_MEMORY_BYTES" not in env and "BATON_ENFORCE_EAGER" in env
    assert env["BATON_ENFORCE_EAGER"] is None  # passed through from the shell only


def test_mounted_config_files_exist():
    for svc in load("compose.yaml")["services"].values():
        for volume in svc.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (COMPOSE / source).exists(), volume


def test_cpu_override_serves_the_model_its_image_carries_without_a_gpu():
    services = load("compose.cpu.yaml")["services"]
    worker = services["inference-worker"]
    assert "deploy" not in worker
    assert worker["build"]["dockerfile"] == "deploy/docker/Dockerfile.worker-cpu"
    assert worker["shm_size"]  # vLLM's engine core needs more than Docker's 64 MiB
    # The image names its model (make images: images.sh's default_model); compose
    # neither overrides it nor builds another one at start.
    assert "BATON_MODEL" not in worker["environment"] and "volumes" not in worker
    assert list(services) == ["inference-worker"]
    dockerfile = (DEPLOY / "docker" / "Dockerfile.worker-cpu").read_text()
    assert re.search(r"^ENV BATON_MODEL=/models/\$\{MODEL_NAME\} \\$", dockerfile, re.M)
    assert re.search(r"^COPY --from=model /model /models/\$\{MODEL_NAME\}$", dockerfile, re.M)


def make_up_default_model() -> str:
    """The name of the model `make up` serves when BATON_MODEL is unset."""
    try:  # the real default model, once baton/models.py names it
        from baton.models import DEFAULT_MODEL
    except ImportError:
        from services.inference_worker.settings import WorkerSettings

        return WorkerSettings(_env_file=None).served_model_name
    return str(DEFAULT_MODEL)


def test_the_worker_image_serves_the_model_make_up_serves():
    # images.sh names the image's model in one place (default_model, MODEL_NAME).
    images = (DEPLOY / "docker" / "images.sh").read_text()
    (name,) = re.findall(r"^MODEL_NAME=(\S+)$", images, re.M)
    assert name == make_up_default_model()


@pytest.mark.parametrize(
    ("dockerfile", "endpoint"),
    [
        ("Dockerfile.services", "/healthz"),
        ("Dockerfile.worker-cpu", "/readyz"),
        ("Dockerfile.gpu", "/readyz"),
        ("Dockerfile.nats", "/healthz"),
        ("Dockerfile.prometheus", "/-/ready"),
    ],
)
def test_dockerfiles_run_non_root_with_a_healthcheck(dockerfile, endpoint):
    text = (DEPLOY / "docker" / dockerfile).read_text()
    users = re.findall(r"^USER\s+(\S+)", text, re.M)
    assert users and all(not u.startswith(("root", "0")) for u in users)
    assert re.search(rf"^HEALTHCHECK .*\n?.*{endpoint}", text, re.M)
    assert "# syntax=" not in text  # needs a registry (the dockerfile frontend image)
