"""Kubernetes manifests: workloads, probes, services, volumes, the shared-models component,
`kubectl kustomize` builds them, and the services load the configuration they pass."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy.deploy_facts import (
    CONSOLE_SCRIPT,
    DEFAULT_GRACE_SECONDS,
    GRPC_PORT,
    HEALTH_SERVICE,
    JOBS,
    K8S_DIR,
    K8S_WORKLOAD,
    METRICS_PORT,
    assert_budget_fits,
    container_of,
    flags_of,
    k8s_bytes,
    k8s_env,
    kubectl_path,
    kustomization,
    load_service_config,
    workload_of,
)


def test_kustomization_lists_every_manifest() -> None:
    listed = set(kustomization()["resources"])
    on_disk = {p.name for p in K8S_DIR.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == on_disk


def test_k8s_namespace(k8s_objects: list[dict[str, Any]]) -> None:
    namespaces = [o["metadata"]["name"] for o in k8s_objects if o["kind"] == "Namespace"]
    assert namespaces == [kustomization()["namespace"]]


@pytest.mark.parametrize("job", JOBS)
def test_k8s_workload(job: str, k8s_objects: list[dict[str, Any]]) -> None:
    workload = workload_of(k8s_objects, job)
    pod = workload["spec"]["template"]
    container = container_of(workload)
    args = container["args"]
    assert "command" not in container, "args keep the image's tini entrypoint"
    assert args[0] == CONSOLE_SCRIPT[job]
    flags = flags_of(args)
    assert flags["--port"] == str(GRPC_PORT[job])
    assert flags["--metrics-port"] == str(METRICS_PORT[job])

    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"grpc": GRPC_PORT[job], "metrics": METRICS_PORT[job]}

    # Exec probes with the healthcheck module over mutual TLS (native gRPC probes have no TLS):
    # readiness asks for the service's own name, startup and liveness for "" (the process).
    mounted = {m["mountPath"] for m in container["volumeMounts"]}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        command = container[probe]["exec"]["command"]
        assert command[:3] == ["python", "-m", "voxserve_common.healthcheck"], probe
        flags = flags_of(command)
        for flag in ("--tls-ca", "--tls-cert", "--tls-key"):
            assert str(Path(flags[flag]).parent) in mounted, f"{probe} {flag} is not on a mounted volume"
        positional = [c for c in command[3:] if not c.startswith("--")]
        expected = [f"127.0.0.1:{GRPC_PORT[job]}"] + ([HEALTH_SERVICE[job]] if probe == "readinessProbe" else [])
        assert positional == expected, probe
        assert container[probe]["timeoutSeconds"] >= 5, "a Python start-up on a loaded node takes a while"

    spec = pod["spec"]
    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    pause = int(pre_stop[1]) if pre_stop[0] == "sleep" else 0
    assert spec["terminationGracePeriodSeconds"] > DEFAULT_GRACE_SECONDS + pause

    resources = container["resources"]
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(resources[kind]), kind
    assert k8s_bytes(resources["requests"]["memory"]) <= k8s_bytes(resources["limits"]["memory"])

    annotations = pod["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(METRICS_PORT[job])
    assert annotations["prometheus.io/path"] == "/metrics"
    assert annotations["voxserve.io/metrics-job"] == job

    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["runAsUser"] != 0
    assert container["securityContext"]["allowPrivilegeEscalation"] is False

    config_maps = {o["metadata"]["name"] for o in k8s_objects if o["kind"] == "ConfigMap"}
    for source in container.get("envFrom", []):
        assert source["configMapRef"]["name"] in config_maps


@pytest.mark.parametrize("job", JOBS)
def test_k8s_service_exposes_the_ports(job: str, k8s_objects: list[dict[str, Any]]) -> None:
    _, name = K8S_WORKLOAD[job]
    (service,) = [o for o in k8s_objects if o["kind"] == "Service" and o["metadata"]["name"] == name]
    ports = {p["name"]: (p["port"], p["targetPort"]) for p in service["spec"]["ports"]}
    assert ports["grpc"] == (GRPC_PORT[job], "grpc")
    assert ports["metrics"] == (METRICS_PORT[job], "metrics")
    assert service["spec"]["selector"] == workload_of(k8s_objects, job)["spec"]["selector"]["matchLabels"]


def test_k8s_store_data_dir_is_the_persistent_volume(k8s_objects: list[dict[str, Any]]) -> None:
    store = workload_of(k8s_objects, "model_service")
    data_dir = flags_of(container_of(store)["args"])["--data-dir"]
    mounts = {m["mountPath"]: m["name"] for m in container_of(store)["volumeMounts"]}
    volumes = {v["name"]: v for v in store["spec"]["template"]["spec"]["volumes"]}
    claim = volumes[mounts[data_dir]]["persistentVolumeClaim"]["claimName"]
    claims = {o["metadata"]["name"] for o in k8s_objects if o["kind"] == "PersistentVolumeClaim"}
    assert claim in claims
    assert store["spec"]["replicas"] == 1, "one store owns the volume"
    headless = store["spec"]["serviceName"]
    assert any(o["kind"] == "Service" and o["metadata"]["name"] == headless for o in k8s_objects)


def test_k8s_shared_models_component_mounts_the_store_dir(k8s_objects: list[dict[str, Any]]) -> None:
    store = workload_of(k8s_objects, "model_service")
    store_dir = flags_of(container_of(store)["args"])["--data-dir"]
    (claim,) = [
        v["persistentVolumeClaim"]["claimName"]
        for v in store["spec"]["template"]["spec"]["volumes"]
        if "persistentVolumeClaim" in v
    ]
    component = yaml.safe_load((K8S_DIR / "components" / "shared-models" / "kustomization.yaml").read_text())
    assert component["kind"] == "Component"
    patches = [yaml.safe_load(p["patch"]) for p in component["patches"]]
    (claim_patch,) = [p for p in patches if isinstance(p, list)]
    assert claim_patch == [{"op": "replace", "path": "/spec/accessModes", "value": ["ReadWriteMany"]}]
    (deployment,) = [p for p in patches if isinstance(p, dict) and p["kind"] == "Deployment"]
    assert deployment["metadata"]["name"] == K8S_WORKLOAD["inference_service"][1]
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["name"] == container_of(workload_of(k8s_objects, "inference_service"))["name"]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env == {"VOXSERVE_STORE_ACCESS": "shared", "VOXSERVE_SHARED_STORE_DIR": store_dir}
    assert container["volumeMounts"] == [{"name": "models", "mountPath": store_dir, "readOnly": True}]
    assert pod["volumes"] == [{"name": "models", "persistentVolumeClaim": {"claimName": claim, "readOnly": True}}]


def test_kustomize_builds_base_and_shared_models(tmp_path: Path) -> None:
    kubectl = kubectl_path()
    base = subprocess.run([kubectl, "kustomize", str(K8S_DIR)], capture_output=True, text=True, timeout=60)
    assert base.returncode == 0, base.stderr
    namespaced = [doc for doc in yaml.safe_load_all(base.stdout) if doc["kind"] != "Namespace"]
    assert {doc["metadata"].get("namespace") for doc in namespaced} == {kustomization()["namespace"]}

    overlay = tmp_path / "overlay"
    overlay.mkdir()
    rel = os.path.relpath(K8S_DIR, overlay)
    (overlay / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "kustomize.config.k8s.io/v1beta1",
                "kind": "Kustomization",
                "resources": [rel],
                "components": [f"{rel}/components/shared-models"],
            }
        )
    )
    built = subprocess.run([kubectl, "kustomize", str(overlay)], capture_output=True, text=True, timeout=60)
    assert built.returncode == 0, built.stderr
    docs = {(d["kind"], d["metadata"]["name"]): d for d in yaml.safe_load_all(built.stdout)}
    assert docs[("PersistentVolumeClaim", "voxserve-models")]["spec"]["accessModes"] == ["ReadWriteMany"]
    pod = docs[("Deployment", "inference")]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["VOXSERVE_SHARED_STORE_DIR"] == "/var/lib/voxserve/models"
    assert env["VOXSERVE_STORE_ACCESS"] == "shared"
    claims = [v["persistentVolumeClaim"] for v in pod["volumes"] if "persistentVolumeClaim" in v]
    assert claims == [{"claimName": "voxserve-models", "readOnly": True}]


def test_k8s_services_load_their_config(k8s_objects: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch) -> None:
    store_container = container_of(workload_of(k8s_objects, "model_service"))
    store_env = k8s_env(store_container, k8s_objects)
    store = load_service_config("model_service", store_container["args"], store_env, monkeypatch)
    assert (store.host, store.port, store.metrics_port) == (
        "0.0.0.0",
        GRPC_PORT["model_service"],
        METRICS_PORT["model_service"],
    )
    assert str(store.data_dir) in [m["mountPath"] for m in store_container["volumeMounts"]]

    container = container_of(workload_of(k8s_objects, "inference_service"))
    inference = load_service_config(
        "inference_service", container["args"], k8s_env(container, k8s_objects), monkeypatch
    )
    assert (inference.host, inference.port) == ("0.0.0.0", GRPC_PORT["inference_service"])
    assert inference.metrics_port == METRICS_PORT["inference_service"]
    store_service = next(o for o in k8s_objects if o["kind"] == "Service" and o["metadata"]["name"] == "model-store")
    assert inference.model_store == f"{store_service['metadata']['name']}:{store.port}"
    # The base has no shared volume (ReadWriteOnce): files come over gRPC.
    assert inference.store_access == "fetch"
    assert inference.shared_store_dir is None
    assert str(inference.cache_dir) in [m["mountPath"] for m in container["volumeMounts"]]
    assert_budget_fits(inference.memory_budget, k8s_bytes(container["resources"]["limits"]["memory"]))
