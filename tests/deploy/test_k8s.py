"""Kubernetes: every overlay renders, built-in objects validate against the
Kubernetes schemas (offline), and the KEDA/probe/drain settings are right."""

from __future__ import annotations

import json
import re
import shutil
import urllib.parse
from functools import cache

import pytest
import yaml
from conftest import DEPLOY, run

from proto import streams

K8S = DEPLOY / "k8s"
OVERLAYS = sorted(p.parent.name for p in (K8S / "overlays").glob("*/kustomization.yaml"))
K8S_VERSION = "1.30.0"  # oldest Kubernetes we support
NAMESPACE = "baton"
SCALER_FIELDS = {"serverAddress", "query", "threshold", "activationThreshold"}


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
    assert set(deployments) == {"orchestrator", "context-store", "inference-worker", "tool-worker"}
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
    assert {8080, 8081, 8082, 8083} == {
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
    # GPU engine values: tensor parallelism over exactly the GPUs requested,
    # shared memory for it, and none of the CPU profile's demo values.
    env = {e["name"]: e.get("value") for e in container(worker)["env"]}
    assert int(env["BATON_TENSOR_PARALLEL_SIZE"]) == res["limits"]["nvidia.com/gpu"]
    assert 0 < float(env["BATON_GPU_MEMORY_UTILIZATION"]) < 1
    assert not {"BATON_KV_CACHE_MEMORY_BYTES", "BATON_ENFORCE_EAGER"} & set(env)
    mounts = {m["mountPath"]: m["name"] for m in container(worker)["volumeMounts"]}
    (shm,) = [v for v in pod["volumes"] if v["name"] == mounts["/dev/shm"]]
    assert shm["emptyDir"]["medium"] == "Memory"


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
    expected = {
        "inference-worker": streams.worker_consumer("default"),
        "tool-worker": streams.tool_consumer("default"),
    }
    assert set(scaled) == {*expected, "orchestrator"}
    # The orchestrators: one Prometheus trigger over every tenant's task stream.
    (tasks,) = scaled["orchestrator"]["spec"]["triggers"]
    assert tasks["type"] == "prometheus" and int(tasks["metadata"]["threshold"]) > 0
    durable = streams.task_consumer("any").durable
    assert f'consumer="{durable}"' in tasks["metadata"]["query"]
    assert "max by (stream)" in tasks["metadata"]["query"]
    assert "baton_consumer_pending_messages" in tasks["metadata"]["query"]
    for name, so in scaled.items():
        spec = so["spec"]
        if name == "orchestrator":
            continue
        assert spec["scaleTargetRef"]["name"] in deployments
        (trigger,) = spec["triggers"]
        meta = trigger["metadata"]
        # Not nats-jetstream: KEDA matches /jsz's account *name* against the
        # account it asked for, which operator mode wants as a public key.
        assert trigger["type"] == "prometheus"
        assert meta.keys() >= SCALER_FIELDS
        assert all(isinstance(v, str) for v in meta.values()), "KEDA metadata must be strings"
        # The backlog the orchestrators export for exactly this consumer (max over replicas).
        series = (f'baton_consumer_pending_messages{{stream="{expected[name].stream}", '
                  f'consumer="{expected[name].durable}"}}')  # fmt: skip
        assert meta["query"] == f"max({series})"
        assert int(meta["threshold"]) > 0
        assert spec["minReplicaCount"] <= spec["maxReplicaCount"]
    worker = scaled["inference-worker"]["spec"]
    assert worker["minReplicaCount"] == 0
    # KEDA activates when lag > activationThreshold: one waiting job must do it.
    assert int(worker["triggers"][0]["metadata"]["activationThreshold"]) == 0
    assert scaled["orchestrator"]["spec"]["minReplicaCount"] >= 1


def test_the_day_floor_component_adds_a_cron_floor_to_the_worker_scaled_object(tmp_path):
    """Opt-in (no overlay ships it): an overlay with components/day-floor
    renders the worker's ScaledObject with its backlog trigger unchanged, one
    worker at least and a KEDA cron trigger, as the scaling simulator replays it."""
    from deploy.scaling import keda, sim

    shutil.copytree(K8S, tmp_path / "k8s")
    day = tmp_path / "k8s" / "overlays" / "day"
    day.mkdir()
    base = yaml.safe_load((K8S / "overlays" / "single" / "kustomization.yaml").read_text())
    base["components"].append("../../components/day-floor")
    (day / "kustomization.yaml").write_text(yaml.safe_dump(base))
    plain = objects("single", "ScaledObject")["inference-worker"]["spec"]  # skips without tools
    tool = shutil.which("kustomize") or shutil.which("kubectl")
    assert tool is not None
    out = run([tool, "build" if tool.endswith("kustomize") else "kustomize", str(day)])
    assert out.returncode == 0, out.stderr
    docs = [d for d in yaml.safe_load_all(out.stdout) if d]
    (spec,) = [d["spec"] for d in docs
               if d["kind"] == "ScaledObject" and d["metadata"]["name"] == "inference-worker"]  # fmt: skip
    backlog, cron = spec["triggers"]
    assert backlog == plain["triggers"][0] and plain["minReplicaCount"] == 0
    assert spec["minReplicaCount"] == 1 and spec["maxReplicaCount"] == plain["maxReplicaCount"]
    assert cron["type"] == "cron"
    assert cron["metadata"].keys() == {"timezone", "start", "end", "desiredReplicas"}
    assert all(isinstance(v, str) for v in cron["metadata"].values()), "KEDA wants strings"
    assert int(cron["metadata"]["desiredReplicas"]) <= spec["maxReplicaCount"]
    # What the simulator replays as policy 6 is what renders here.
    path = day / "so.yaml"
    path.write_text(yaml.safe_dump_all(docs))
    rendered = keda.load_policy(path)
    assert rendered.floors == sim.load_pools()["day_floor"]["large"].floors
    assert rendered.min_replicas == sim.load_pools()["day_floor"]["large"].min_replicas


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
    relabel = pm["podMetricsEndpoints"][0]["relabelings"][0]
    assert relabel["targetLabel"] == "service"  # as in compose: the dashboard groups by it


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_dashboard_ships_as_a_configmap_for_the_grafana_sidecar(overlay):
    cm = objects(overlay, "ConfigMap")["baton-dashboard"]
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert cm["metadata"].get("namespace", NAMESPACE) == NAMESPACE
    dashboard = json.loads((DEPLOY / "grafana" / "dashboards" / "baton.json").read_text())
    assert json.loads(cm["data"]["baton.json"]) == dashboard


# -- fences: NetworkPolicies, TLS, encryption at rest, API keys --------------

BATON_PODS = {"nats", "orchestrator", "context-store", "inference-worker", "tool-worker"}
ANYONE = "anyone"


def _pods(overlay: str) -> dict[str, dict]:
    """Pod templates by app name, with their labels and container ports."""
    pods = {}
    for kind in ("Deployment", "StatefulSet"):
        for d in objects(overlay, kind).values():
            tpl = d["spec"]["template"]
            pods[tpl["metadata"]["labels"]["app.kubernetes.io/name"]] = tpl
    return pods


def _selects(selector: dict, labels: dict) -> bool:
    if not selector.get("matchLabels", {}).items() <= labels.items():
        return False
    for e in selector.get("matchExpressions", []):
        assert e["operator"] == "In", e  # the only operator these policies use
        if labels.get(e["key"]) not in e["values"]:
            return False
    return True


def _peer(peer: dict, pods: dict[str, dict]) -> set[str]:
    """Who a `from` entry admits: pods of this namespace by name, or
    `ns/<namespace>` for a peer in another namespace."""
    if "namespaceSelector" in peer:
        ns = peer["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"]
        return {f"ns/{ns}"}
    return {
        n for n, tpl in pods.items() if _selects(peer["podSelector"], tpl["metadata"]["labels"])
    }


def reachers(overlay: str, pod: str, port: int, policies: list[dict] | None = None) -> set[str]:
    """Who may open `port` on `pod`, as the overlay's NetworkPolicies (or
    `policies`, their specs) say. A pod no policy selects is open to anyone
    (Kubernetes' default)."""
    pods = _pods(overlay)
    labels = pods[pod]["metadata"]["labels"]
    if policies is None:
        policies = [p["spec"] for p in objects(overlay, "NetworkPolicy").values()]
    mine = [p for p in policies if _selects(p["podSelector"], labels)]
    if not any("Ingress" in p["policyTypes"] for p in mine):
        return {ANYONE}
    who: set[str] = set()
    for p in mine:
        for rule in p.get("ingress", []):
            ports = {pp["port"] for pp in rule.get("ports", [])}
            if ports and port not in ports:
                continue
            if "from" not in rule:
                return {ANYONE}
            for peer in rule["from"]:
                who |= _peer(peer, pods)
    return who


def _port(overlay: str, pod: str, name: str) -> int:
    (c,) = _pods(overlay)[pod]["spec"]["containers"]
    return next(p["containerPort"] for p in c["ports"] if p["name"] == name)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_network_policies_fence_nats_and_the_admin_http(overlay):
    nats = lambda name: reachers(overlay, "nats", _port(overlay, "nats", name))  # noqa: E731
    assert nats("cluster") == {"nats"}
    assert nats("monitor") == BATON_PODS | {"ns/keda"}  # KEDA's scaler reads /jsz
    assert nats("client") == {ANYONE}  # authenticated, TLS
    for admin in ("context-store", "inference-worker", "tool-worker"):
        assert reachers(overlay, admin, _port(overlay, admin, "http")) == BATON_PODS | {
            "ns/monitoring"  # Prometheus scrapes /metrics
        }
    # The tenants' HTTP API (API keys required) stays reachable.
    assert reachers(overlay, "orchestrator", _port(overlay, "orchestrator", "http")) == {ANYONE}


def test_reachers_sees_an_open_port():
    """The model above is not vacuous: with no policy, or with a rule that
    names no peer, the cluster port is open to anyone."""
    policies = objects("single", "NetworkPolicy")
    assert reachers("single", "nats", 6222) == {"nats"}
    assert reachers("single", "nats", 6222, []) == {ANYONE}
    loose = {**policies["nats"]["spec"], "ingress": [{"ports": [{"port": 6222}]}]}
    assert reachers("single", "nats", 6222, [loose]) == {ANYONE}


def _env(c: dict) -> dict[str, dict]:
    return {e["name"]: e for e in c.get("env", [])}


def _mount_of(pod: dict, path: str) -> tuple[dict, dict]:
    """The (volume, volumeMount) that holds file `path` in `pod`."""
    (c,) = pod["spec"]["containers"]
    mount = max(
        (m for m in c["volumeMounts"] if path.startswith(m["mountPath"].rstrip("/") + "/")),
        key=lambda m: len(m["mountPath"]),
    )
    (volume,) = [v for v in pod["spec"]["volumes"] if v["name"] == mount["name"]]
    return volume, mount


def _tls_files(conf: str) -> dict[str, str]:
    return dict(re.findall(r'(cert_file|key_file|ca_file):\s*"([^"]+)"', conf))


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_nats_client_tls_from_a_cert_manager_certificate(overlay):
    sts, conf = _nats(overlay)
    (cm,) = [d for n, d in objects(overlay, "ConfigMap").items() if n.startswith("nats-config")]
    assert "include ./tls.conf" in conf
    tls = cm["data"]["tls.conf"]
    assert re.search(r"^tls \{", tls, re.M)
    certs = objects(overlay, "Certificate")
    issuers = objects(overlay, "Issuer")
    server = certs["nats-server"]["spec"]
    assert server["issuerRef"]["name"] in issuers
    assert issuers[server["issuerRef"]["name"]]["spec"]["ca"]["secretName"] in {
        c["spec"]["secretName"] for c in certs.values() if c["spec"].get("isCA")
    }
    # The certificate names the host the services dial and the advertised pod names.
    for d in objects(overlay, "Deployment").values():
        url = _env(container(d))["BATON_NATS_URL"]["value"]
        assert urllib.parse.urlsplit(url).hostname in server["dnsNames"], url
    assert f"*.nats-headless.{NAMESPACE}.svc.cluster.local" in server["dnsNames"]
    # nats-server reads the files from the Secret the Certificate fills.
    pod = sts["spec"]["template"]
    files = _tls_files(tls)
    assert set(files) == {"cert_file", "key_file"}
    for key, path in files.items():
        volume, _ = _mount_of(pod, path)
        assert volume["secret"]["secretName"] == server["secretName"]
        assert path.endswith({"cert_file": "/tls.crt", "key_file": "/tls.key"}[key])
    # Every service verifies the server with the CA alone (not the server's key).
    for name, d in objects(overlay, "Deployment").items():
        c = container(d)
        ca = _env(c)["BATON_NATS_TLS_CA"]["value"]
        volume, _ = _mount_of(d["spec"]["template"], ca)
        assert volume["secret"]["secretName"] == server["secretName"], name
        assert volume["secret"]["items"] == [{"key": "ca.crt", "path": ca.rsplit("/", 1)[1]}]


def test_cluster_routes_use_mutual_tls():
    sts, conf = _nats("cluster")
    cluster = conf[conf.index("cluster {") :]
    assert re.search(r"tls \{[^}]*verify: true", cluster), cluster
    routes = objects("cluster", "Certificate")["nats-routes"]["spec"]
    assert {"server auth", "client auth"} <= set(routes["usages"])
    assert f"*.nats-headless.{NAMESPACE}.svc.cluster.local" in routes["dnsNames"]
    for path in _tls_files(cluster).values():
        volume, _ = _mount_of(sts["spec"]["template"], path)
        assert volume["secret"]["secretName"] == routes["secretName"]


def _secret_ref(env: dict) -> tuple[str, str]:
    ref = env["valueFrom"]["secretKeyRef"]
    return ref["name"], ref["key"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_jetstream_is_encrypted_at_rest_with_a_key_from_a_secret(overlay):
    sts, conf = _nats(overlay)
    js = conf[conf.index("jetstream {") :]
    js = js[: js.index("}")]
    assert re.search(r"^\s*cipher:\s*chachapoly$", js, re.M)
    (var,) = re.findall(r"^\s*key:\s*\$(\w+)$", js, re.M)
    name, _ = _secret_ref(_env(sts["spec"]["template"]["spec"]["containers"][0])[var])
    assert name not in objects(overlay, "Secret"), "the key must not be rendered from git"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_services_bound_beyond_loopback_take_api_keys_from_a_secret(overlay):
    from baton.service import bind_refusal

    host = _baton_config(overlay)["BATON_HTTP_HOST"]
    assert bind_refusal(host, {}) is not None  # so keys are required here
    for name, d in objects(overlay, "Deployment").items():
        secret, key = _secret_ref(_env(container(d))["BATON_API_KEYS"])
        assert key == "BATON_API_KEYS", name
        assert secret not in objects(overlay, "Secret"), "API keys must not be rendered from git"
