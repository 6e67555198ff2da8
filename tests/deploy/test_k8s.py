"""Kubernetes: every overlay renders, built-in objects validate against the
Kubernetes schemas (offline), and the KEDA/probe/drain settings are right."""

from __future__ import annotations

import shutil
from functools import cache

import pytest
import yaml
from conftest import DEPLOY, run

from proto import streams

K8S = DEPLOY / "k8s"
OVERLAYS = sorted(p.parent.name for p in (K8S / "overlays").glob("*/kustomization.yaml"))
K8S_VERSION = "1.30.0"  # oldest Kubernetes we support
NAMESPACE = "baton"
SCALER_FIELDS = {
    "natsServerMonitoringEndpoint",
    "account",
    "stream",
    "consumer",
    "lagThreshold",
}


@cache
def render(overlay: str) -> tuple[dict, ...]:
    if kustomize := shutil.which("kustomize"):
        cmd = [kustomize, "build", str(K8S / "overlays" / overlay)]
    elif kubectl := shutil.which("kubectl"):
        cmd = [kubectl, "kustomize", str(K8S / "overlays" / overlay)]
    else:
        pytest.skip("neither kustomize nor kubectl is installed (docs/deploy.md, 'CI tools')")
    out = run(cmd, timeout=60)
    assert out.returncode == 0, out.stderr
    return tuple(d for d in yaml.safe_load_all(out.stdout) if d)


def objects(overlay: str, kind: str) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in render(overlay) if d["kind"] == kind}


def container(deploy: dict) -> dict:
    (c,) = deploy["spec"]["template"]["spec"]["containers"]
    return c


def test_there_are_overlays():
    assert {"single", "cluster"} <= set(OVERLAYS)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_builtin_objects_validate_against_kubernetes_schemas(overlay):
    kv = pytest.importorskip("kubernetes_validate")
    checked = 0
    for doc in render(overlay):
        group = doc["apiVersion"].rpartition("/")[0]
        if "." in group and not group.endswith(".k8s.io"):
            continue  # CRD-backed (KEDA, Prometheus Operator): checked below
        kv.validate(doc, K8S_VERSION, strict=True)
        assert doc["metadata"].get("namespace", NAMESPACE) == NAMESPACE
        checked += 1
    assert checked >= 15


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_services_have_probes_resources_pdbs_and_services(overlay):
    deployments = objects(overlay, "Deployment")
    assert set(deployments) == {"orchestrator", "context-store", "inference-worker"}
    pdbs = objects(overlay, "PodDisruptionBudget")
    services = objects(overlay, "Service")
    for name, d in deployments.items():
        c = container(d)
        port = c["ports"][0]["containerPort"]
        assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
        assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
        assert c["resources"]["requests"]["cpu"] and c["resources"]["requests"]["memory"]
        labels = d["spec"]["template"]["metadata"]["labels"]
        assert pdbs[name]["spec"]["selector"]["matchLabels"].items() <= labels.items()
        assert services[name]["spec"]["ports"][0]["port"] == port
        env = {e["name"]: e.get("value") for e in c.get("env", [])}
        assert env["BATON_HTTP_PORT"] == str(port)
    assert {8080, 8081, 8082} == {
        container(d)["ports"][0]["containerPort"] for d in deployments.values()
    }


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_worker_has_a_gpu_and_time_to_drain(overlay):
    worker = objects(overlay, "Deployment")["inference-worker"]
    pod = worker["spec"]["template"]["spec"]
    res = container(worker)["resources"]
    assert res["limits"]["nvidia.com/gpu"] == 1 == res["requests"]["nvidia.com/gpu"]
    assert pod["terminationGracePeriodSeconds"] >= 120
    assert container(worker)["startupProbe"]["failureThreshold"] * 10 >= 300


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_context_key_comes_from_a_secret(overlay):
    store = container(objects(overlay, "Deployment")["context-store"])
    (secret_name,) = [s["secretRef"]["name"] for s in store["envFrom"] if "secretRef" in s]
    secret = objects(overlay, "Secret")[secret_name]
    assert "BATON_CONTEXT_KEY" in secret["data"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_keda_scaled_objects_match_streams_and_scaler_needs(overlay):
    scaled = objects(overlay, "ScaledObject")
    deployments = objects(overlay, "Deployment")
    services = objects(overlay, "Service")
    expected = {
        "inference-worker": streams.worker_consumer("default"),
        "orchestrator": streams.ORCHESTRATOR_TASKS,
    }
    assert set(scaled) == set(expected)
    for name, so in scaled.items():
        spec = so["spec"]
        assert spec["scaleTargetRef"]["name"] in deployments
        (trigger,) = spec["triggers"]
        meta = trigger["metadata"]
        assert trigger["type"] == "nats-jetstream"
        assert meta.keys() >= SCALER_FIELDS
        assert all(isinstance(v, str) for v in meta.values()), "KEDA metadata must be strings"
        assert (meta["stream"], meta["consumer"]) == (expected[name].stream, expected[name].durable)
        assert meta["account"] == "$G"
        assert int(meta["lagThreshold"]) > 0
        host, _, port = meta["natsServerMonitoringEndpoint"].partition(":")
        svc, ns = host.split(".")[:2]
        assert ns == NAMESPACE and svc in services and port == "8222"
        assert spec["minReplicaCount"] <= spec["maxReplicaCount"]
    worker = scaled["inference-worker"]["spec"]
    assert worker["minReplicaCount"] == 0
    # KEDA activates when lag > activationLagThreshold: one waiting job must do it.
    assert int(worker["triggers"][0]["metadata"]["activationLagThreshold"]) == 0
    assert scaled["orchestrator"]["spec"]["minReplicaCount"] >= 1


def _nats(overlay: str) -> tuple[dict, str]:
    sts = objects(overlay, "StatefulSet")["nats"]
    (cm,) = [d for n, d in objects(overlay, "ConfigMap").items() if n.startswith("nats-config")]
    return sts, cm["data"]["nats.conf"]


def _baton_config(overlay: str) -> dict:
    (cm,) = [d for n, d in objects(overlay, "ConfigMap").items() if n.startswith("baton-config")]
    return cm["data"]


def test_single_overlay_is_one_node_r1():
    sts, conf = _nats("single")
    assert sts["spec"]["replicas"] == 1 and "cluster {" not in conf
    assert "jetstream" in conf
    assert _baton_config("single")["BATON_STREAM_REPLICAS"] == "1"


def test_cluster_overlay_is_three_routed_nodes_r3():
    sts, conf = _nats("cluster")
    assert sts["spec"]["replicas"] == 3
    routes = [f"nats://nats-{i}.nats-headless.{NAMESPACE}.svc.cluster.local:6222" for i in range(3)]
    assert all(r in conf for r in routes) and "jetstream" in conf
    assert _baton_config("cluster")["BATON_STREAM_REPLICAS"] == "3"
    assert "nats" in objects("cluster", "PodDisruptionBudget")
    headless = objects("cluster", "Service")["nats-headless"]["spec"]
    assert headless["clusterIP"] == "None" and headless["publishNotReadyAddresses"] is True


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_monitoring_objects_present(overlay):
    assert "baton" in objects(overlay, "PrometheusRule")
    pm = objects(overlay, "PodMonitor")["baton"]["spec"]
    assert pm["podMetricsEndpoints"][0]["path"] == "/metrics"
    names = set(pm["selector"]["matchExpressions"][0]["values"])
    assert names == set(objects(overlay, "Deployment"))
