"""The deployment files: the Kubernetes manifests (docker/k8s, rendered with `kubectl kustomize`) and the compose
file (docker/compose.yaml).

Kubernetes: every rendered object validates against the Kubernetes 1.32 schemas (kubernetes-validate, strict:
an unknown field is an error), and the objects agree with each other (references, probes, the Triton address,
HPA and PDB targets). Needs `kubectl` on PATH: without it these tests fail, they never skip.

Compose: parsed and cross-checked here (no Docker engine needed); `docker compose config` runs as well where
the compose plugin is installed.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
from functools import cache
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from gateway.settings import PROJECT_ROOT

DOCKER = PROJECT_ROOT / "docker"
K8S = DOCKER / "k8s"
COMPOSE = DOCKER / "compose.yaml"
# The cluster version the manifests target (kubectl 1.32's).
KUBERNETES_VERSION = "1.32"
# The overlays, and the example of an operator's own overlay (docker/k8s/examples/cluster-ranges).
TARGETS = ["base", "overlays/cpu", "overlays/gpu", "overlays/gpu-tensorrt", "examples/cluster-ranges"]
# The Secrets the operator creates before `kubectl apply -k` (never part of a kustomization), as an example.
EXAMPLE_SECRETS = K8S / "examples" / "secrets.example.yaml"
NAMESPACE = "imagen"
GATEWAY, TRITON = "imagen-gateway", "imagen-triton"
WORKLOADS = {"Deployment", "Job", "StatefulSet", "DaemonSet"}
CLUSTER_SCOPED = {"Namespace"}
PLACEHOLDER = "CHANGE_ME"


# --- Kubernetes ---------------------------------------------------------------------------------------------------


@cache
def render(target: str) -> tuple[dict[str, Any], ...]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.fail("kubectl is not on PATH: these tests render docker/k8s with `kubectl kustomize`")
    result = subprocess.run(
        [kubectl, "kustomize", str(K8S / target)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, f"kubectl kustomize {target} failed:\n{result.stderr}"
    objects = tuple(obj for obj in yaml.safe_load_all(result.stdout) if obj)
    assert objects, f"kubectl kustomize {target} rendered nothing"
    return objects


def by_kind(objects: tuple[dict[str, Any], ...], kind: str) -> dict[str, dict[str, Any]]:
    return {o["metadata"]["name"]: o for o in objects if o["kind"] == kind}


def one(objects: tuple[dict[str, Any], ...], kind: str, name: str) -> dict[str, Any]:
    found = by_kind(objects, kind)
    assert name in found, f"no {kind} {name} in the render (have: {sorted(found)})"
    return found[name]


def pod_spec(workload: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = workload["spec"]["template"]["spec"]
    return spec


def containers(workload: dict[str, Any]) -> list[dict[str, Any]]:
    spec = pod_spec(workload)
    return [*spec.get("initContainers", []), *spec["containers"]]


def container(workload: dict[str, Any], name: str) -> dict[str, Any]:
    (found,) = [c for c in pod_spec(workload)["containers"] if c["name"] == name]
    return found


def secret_keys(secret: dict[str, Any]) -> set[str]:
    return set(secret.get("data") or {}) | set(secret.get("stringData") or {})


@cache
def example_secrets() -> dict[str, dict[str, Any]]:
    """The Secrets the workloads read by name, as docker/k8s/examples/secrets.example.yaml shows them."""
    docs = [d for d in yaml.safe_load_all(EXAMPLE_SECRETS.read_text()) if d]
    assert docs and all(d["kind"] == "Secret" for d in docs)
    return {d["metadata"]["name"]: d for d in docs}


def env_value(objects: tuple[dict[str, Any], ...], workload: dict[str, Any], ctr: dict[str, Any], name: str) -> str:
    """A container's variable as the kubelet resolves it: `env` wins over `envFrom` (ConfigMaps and Secrets)."""
    for entry in ctr.get("env", []):
        if entry["name"] == name:
            if "value" in entry:
                return str(entry["value"])
            ref = entry["valueFrom"]
            if "configMapKeyRef" in ref:
                data = one(objects, "ConfigMap", ref["configMapKeyRef"]["name"])["data"]
                return str(data[ref["configMapKeyRef"]["key"]])
            pytest.fail(f"{name} comes from {ref}, not a plain value or a ConfigMap")
    for source in reversed(ctr.get("envFrom", [])):
        if "configMapRef" in source:
            data = one(objects, "ConfigMap", source["configMapRef"]["name"]).get("data", {})
            if name in data:
                return str(data[name])
    pytest.fail(f"{workload['metadata']['name']}/{ctr['name']} does not set {name}")


def labels_match(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def port_number(ctr: dict[str, Any], port: int | str) -> int:
    if isinstance(port, int):
        return port
    named = {p["name"]: p["containerPort"] for p in ctr.get("ports", []) if "name" in p}
    assert port in named, f"{ctr['name']}: no container port named {port!r} (have {sorted(named)})"
    return int(named[port])


@pytest.mark.parametrize("target", TARGETS)
def test_renders_and_validates_strictly_against_kubernetes_1_32(target: str) -> None:
    objects = render(target)
    errors = []
    for obj in objects:
        where = f"{obj['kind']}/{obj['metadata']['name']}"
        try:
            kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            errors.append(f"{where}: {'.'.join(str(p) for p in exc.path)}: {exc.message}")
        except kubernetes_validate.SchemaNotFoundError as exc:
            errors.append(f"{where}: {exc.message}")
    assert not errors, "\n".join(errors)


def test_the_strict_validation_bites() -> None:
    """A misspelt field in a pod spec and a wrong type are both reported (so the test above means something)."""
    deployment = copy.deepcopy(one(render("base"), "Deployment", GATEWAY))
    container(deployment, "gateway")["readinesProbe"] = {"httpGet": {"path": "/readyz", "port": "http"}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)
    deployment = copy.deepcopy(one(render("base"), "Deployment", GATEWAY))
    deployment["spec"]["revisionHistoryLimit"] = "five"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)


@pytest.mark.parametrize("target", TARGETS)
def test_every_object_is_in_the_namespace_and_names_are_unique(target: str) -> None:
    objects = render(target)
    assert one(objects, "Namespace", NAMESPACE)
    seen = set()
    for obj in objects:
        key = (obj["kind"], obj["metadata"]["name"])
        assert key not in seen, f"{key} twice"
        seen.add(key)
        if obj["kind"] not in CLUSTER_SCOPED:
            assert obj["metadata"].get("namespace") == NAMESPACE, key


@pytest.mark.parametrize("target", TARGETS)
def test_every_reference_of_a_workload_exists(target: str) -> None:
    """ConfigMaps, PVCs, ServiceAccounts and volumes named by a pod template are in the render (the
    configMapGenerator's hashed names included); the Secrets (and their keys) it names are the ones the operator
    creates, as docker/k8s/examples/secrets.example.yaml shows."""
    objects = render(target)
    configmaps, secrets = by_kind(objects, "ConfigMap"), example_secrets()
    claims, accounts = by_kind(objects, "PersistentVolumeClaim"), by_kind(objects, "ServiceAccount")
    workloads = [o for o in objects if o["kind"] in WORKLOADS]
    assert workloads
    for workload in workloads:
        name = f"{workload['kind']}/{workload['metadata']['name']}"
        spec = pod_spec(workload)
        if "serviceAccountName" in spec:
            assert spec["serviceAccountName"] in accounts, f"{name}: no ServiceAccount {spec['serviceAccountName']}"
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        for volume in volumes.values():
            if "persistentVolumeClaim" in volume:
                assert volume["persistentVolumeClaim"]["claimName"] in claims, f"{name}: {volume}"
            if "configMap" in volume:
                assert volume["configMap"]["name"] in configmaps, f"{name}: {volume}"
            if "secret" in volume:
                secret = secrets.get(volume["secret"]["secretName"])
                assert secret is not None, f"{name}: {volume}"
                for item in volume["secret"].get("items", []):
                    assert item["key"] in secret_keys(secret), f"{name}: {item}"
        for ctr in containers(workload):
            for mount in ctr.get("volumeMounts", []):
                assert mount["name"] in volumes, f"{name}/{ctr['name']}: no volume {mount['name']}"
            for source in ctr.get("envFrom", []):
                if "configMapRef" in source:
                    assert source["configMapRef"]["name"] in configmaps, f"{name}: {source}"
                if "secretRef" in source:
                    assert source["secretRef"]["name"] in secrets, f"{name}: {source}"
            for entry in ctr.get("env", []):
                ref = entry.get("valueFrom", {})
                if "secretKeyRef" in ref:
                    secret = secrets.get(ref["secretKeyRef"]["name"])
                    assert secret is not None, f"{name}: {entry}"
                    assert ref["secretKeyRef"]["key"] in secret_keys(secret), f"{name}: {entry}"
                if "configMapKeyRef" in ref:
                    configmap = configmaps.get(ref["configMapKeyRef"]["name"])
                    assert configmap is not None, f"{name}: {entry}"
                    assert ref["configMapKeyRef"]["key"] in configmap.get("data", {}), f"{name}: {entry}"


@pytest.mark.parametrize("target", TARGETS)
def test_no_secret_and_no_placeholder_is_rendered(target: str) -> None:
    """Issue 22, point 5: `kubectl apply -k` never overwrites the operator's Secrets with placeholders."""
    objects = render(target)
    assert not by_kind(objects, "Secret"), "a Secret in the render: every apply would overwrite the real one"
    assert PLACEHOLDER not in json.dumps(objects), f"{PLACEHOLDER} in the render of {target}"
    assert not [o for o in objects if o["kind"] in {"SealedSecret", "ExternalSecret"}]


def test_the_example_secrets_are_placeholders_outside_every_kustomization() -> None:
    """Never a real secret in the repository: the example holds placeholders only, no kustomization lists it,
    it has exactly the names and keys the gateway reads, and the manual creates those, from files."""
    for secret in example_secrets().values():
        assert "data" not in secret, "use stringData placeholders, not base64 data"
        assert secret["metadata"]["namespace"] == NAMESPACE
        for key, value in secret["stringData"].items():
            assert PLACEHOLDER in value, f"Secret {secret['metadata']['name']}: {key} is not a placeholder"
    for kustomization in K8S.rglob("kustomization.yaml"):
        spec = yaml.safe_load(kustomization.read_text())  # comments may name the example; entries may not
        assert "secrets.example" not in json.dumps(spec) and not spec.get("secretGenerator"), kustomization
    gateway = one(render("base"), "Deployment", GATEWAY)
    read: dict[str, set[str]] = {}
    for entry in container(gateway, "gateway")["env"]:
        ref = entry.get("valueFrom", {}).get("secretKeyRef")
        if ref:
            read.setdefault(ref["name"], set()).add(ref["key"])
    for volume in pod_spec(gateway)["volumes"]:
        if "secret" in volume:
            read.setdefault(volume["secret"]["secretName"], set())
    assert set(read) == set(example_secrets())
    for name, keys in read.items():
        assert keys <= secret_keys(example_secrets()[name]), name
    manual = (PROJECT_ROOT / "docs" / "deployment.md").read_text()
    for name, secret in example_secrets().items():
        assert f"kubectl -n {NAMESPACE} create secret generic {name}" in manual, name
        for key in secret_keys(secret):
            assert f"--from-file={key}" in manual, key
    first_command = manual.index(f"\nkubectl -n {NAMESPACE} create secret generic")
    assert first_command < manual.index("\nkubectl apply -k "), "the Secrets first, then the apply"


@pytest.mark.parametrize("target", TARGETS)
def test_the_gateway_is_hardened_probed_and_reads_its_settings(target: str) -> None:
    objects = render(target)
    gateway = one(objects, "Deployment", GATEWAY)
    spec, ctr = pod_spec(gateway), container(gateway, "gateway")
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["runAsUser"] == 10001
    assert ctr["securityContext"]["readOnlyRootFilesystem"] is True
    assert ctr["securityContext"]["allowPrivilegeEscalation"] is False
    assert ctr["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert {"cpu", "memory"} <= set(ctr["resources"]["requests"])
    assert "memory" in ctr["resources"]["limits"]
    # Probes: readiness on /readyz (Triton serves every model), liveness on /healthz (never restarts a gateway
    # because Triton is away), on the container's port.
    port = port_number(ctr, "http")
    assert port == int(env_value(objects, gateway, ctr, "IMAGEN_PORT"))
    for probe, path in (("readinessProbe", "/readyz"), ("livenessProbe", "/healthz"), ("startupProbe", "/healthz")):
        assert ctr[probe]["httpGet"]["path"] == path, probe
        assert port_number(ctr, ctr[probe]["httpGet"]["port"]) == port, probe
    # The settings the scale-out needs, from a Secret where they are secrets.
    secret_env = {e["name"] for e in ctr["env"] if "secretKeyRef" in e.get("valueFrom", {})}
    assert {"IMAGEN_WEBHOOK_SECRET", "IMAGEN_JOBS_DB", "IMAGEN_REDIS_URL", "AWS_SECRET_ACCESS_KEY"} <= secret_env
    jobs_db = example_secrets()["imagen-gateway-secrets"]["stringData"]["IMAGEN_JOBS_DB"]
    assert jobs_db.startswith("postgresql://"), "several replicas need the PostgreSQL job store"
    assert env_value(objects, gateway, ctr, "IMAGEN_STORAGE_URL").startswith("s3://")
    assert env_value(objects, gateway, ctr, "IMAGEN_WORKERS") == "1"
    assert env_value(objects, gateway, ctr, "IMAGEN_HOST") == "0.0.0.0"
    # The API key file is mounted where IMAGEN_API_KEYS_FILE points.
    keys_file = Path(env_value(objects, gateway, ctr, "IMAGEN_API_KEYS_FILE"))
    mounts = {m["mountPath"]: m["name"] for m in ctr["volumeMounts"]}
    volume = {v["name"]: v for v in spec["volumes"]}[mounts[str(keys_file.parent)]]
    items = volume["secret"].get("items")
    files = {i["path"] for i in items} if items else secret_keys(example_secrets()[volume["secret"]["secretName"]])
    assert keys_file.name in files
    # The model repository: the claim is mounted one level above IMAGEN_MODEL_REPOSITORY, read-only.
    repository = Path(env_value(objects, gateway, ctr, "IMAGEN_MODEL_REPOSITORY"))
    assert mounts[str(repository.parent)] == "models"
    assert all(m["readOnly"] for m in ctr["volumeMounts"] if m["name"] in {"models", "api-keys"})
    # Nothing on the command line shadows the environment (the CLI wins over IMAGEN_*).
    assert not any("--triton-url" in str(a) for a in [*ctr.get("command", []), *ctr.get("args", [])])


@pytest.mark.parametrize("target", TARGETS)
def test_the_gateway_balances_over_the_headless_triton_service(target: str) -> None:
    objects = render(target)
    gateway, triton = one(objects, "Deployment", GATEWAY), one(objects, "Deployment", TRITON)
    url = env_value(objects, gateway, container(gateway, "gateway"), "IMAGEN_TRITON_URL")
    host, _, port = url.rpartition(":")
    service = one(objects, "Service", host)
    assert service["spec"]["clusterIP"] == "None", f"{host} must be headless: DNS then returns every Triton pod"
    assert service["spec"].get("publishNotReadyAddresses", False) is False
    assert labels_match(service["spec"]["selector"], triton["spec"]["template"]["metadata"]["labels"])
    (grpc,) = [p for p in service["spec"]["ports"] if p["port"] == int(port)]
    assert port_number(container(triton, "triton"), grpc["targetPort"]) == 8001  # Triton's gRPC port


@pytest.mark.parametrize("target", TARGETS)
def test_triton_probes_and_volumes(target: str) -> None:
    objects = render(target)
    triton = one(objects, "Deployment", TRITON)
    ctr = container(triton, "triton")
    startup = ctr["startupProbe"]
    assert startup["httpGet"]["path"] == "/v2/health/ready"
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600, "model loading can take minutes"
    assert ctr["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert ctr["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert port_number(ctr, ctr[probe]["httpGet"]["port"]) == 8000, probe  # Triton's HTTP port
    mounts = {m["mountPath"]: m for m in ctr["volumeMounts"]}
    assert mounts["/data"]["readOnly"] is True
    volumes = {v["name"]: v for v in pod_spec(triton)["volumes"]}
    assert volumes[mounts["/data"]["name"]]["persistentVolumeClaim"]["claimName"] == "imagen-models"
    assert volumes[mounts["/dev/shm"]["name"]]["emptyDir"]["medium"] == "Memory"  # noqa: S108 - a mount path
    assert pod_spec(triton)["securityContext"]["runAsNonRoot"] is True
    claim = one(objects, "PersistentVolumeClaim", "imagen-models")
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"], "gateways and Tritons mount it from several nodes"


@pytest.mark.parametrize("target", TARGETS)
def test_hpa_targets_the_gateway_and_the_pdb_selects_it(target: str) -> None:
    objects = render(target)
    gateway = one(objects, "Deployment", GATEWAY)
    labels = gateway["spec"]["template"]["metadata"]["labels"]
    assert "replicas" not in gateway["spec"], "the HorizontalPodAutoscaler owns the replica count"
    (hpa,) = by_kind(objects, "HorizontalPodAutoscaler").values()
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": GATEWAY}
    assert hpa["spec"]["minReplicas"] >= 2
    (pdb,) = by_kind(objects, "PodDisruptionBudget").values()
    selector = pdb["spec"]["selector"]["matchLabels"]
    assert labels_match(selector, labels)
    assert not labels_match(selector, one(objects, "Deployment", TRITON)["spec"]["template"]["metadata"]["labels"])
    assert pdb["spec"]["minAvailable"] < hpa["spec"]["minReplicas"], "a budget that can never allow an eviction"
    # The gateway's Service selects the gateway pods, on their http port.
    service = one(objects, "Service", GATEWAY)
    assert labels_match(service["spec"]["selector"], labels)
    assert all(port_number(container(gateway, "gateway"), p["targetPort"]) == 8080 for p in service["spec"]["ports"])


@pytest.mark.parametrize("target", TARGETS)
def test_every_service_and_policy_selects_pods(target: str) -> None:
    objects = render(target)
    templates = [o["spec"]["template"]["metadata"]["labels"] for o in objects if o["kind"] in WORKLOADS]
    for service in by_kind(objects, "Service").values():
        assert any(labels_match(service["spec"]["selector"], t) for t in templates), service["metadata"]["name"]
    for policy in by_kind(objects, "NetworkPolicy").values():
        selector = policy["spec"]["podSelector"].get("matchLabels", {})  # {}: every pod (the default deny)
        assert any(labels_match(selector, t) for t in templates), policy["metadata"]["name"]


def test_gpu_overlay_puts_triton_on_a_gpu_and_the_rest_does_not() -> None:
    gpu = one(render("overlays/gpu"), "Deployment", TRITON)
    ctr, spec = container(gpu, "triton"), pod_spec(gpu)
    assert str(ctr["resources"]["limits"]["nvidia.com/gpu"]) == "1"
    assert ctr["image"].endswith("-gpu"), "the onnxruntime-gpu build of the Triton image"
    assert any(t["key"] == "nvidia.com/gpu" for t in spec["tolerations"])
    assert spec["nodeSelector"]
    assert gpu["spec"]["strategy"]["rollingUpdate"]["maxSurge"] == 0, "no spare GPU for a surge pod"
    for target in ("base", "overlays/cpu"):
        triton = one(render(target), "Deployment", TRITON)
        assert "nvidia.com/gpu" not in json.dumps(triton), target
        assert container(triton, "triton")["image"].endswith("-cpu"), target
    # Only Triton needs a GPU: the gateways stay on any node.
    assert "nvidia.com/gpu" not in json.dumps(one(render("overlays/gpu"), "Deployment", GATEWAY))


def test_tensorrt_overlay_builds_the_plans_on_the_pod_gpu_before_triton() -> None:
    """The init container runs the build script (shipped in its image) on the pod's GPU as the exporter's user,
    with the claim's root writable; Triton keeps /data read-only and gets only the export's TensorRT cache
    folder writable, through its group."""
    from export.repository import ServingOptions

    objects = render("overlays/gpu-tensorrt")
    triton = one(objects, "Deployment", TRITON)
    spec = pod_spec(triton)
    (init,) = spec["initContainers"]
    assert init["image"].startswith("imagen-trt-build:")
    script, *args = init["command"]
    assert script == "/app/scripts/build-trt-plans.sh" and args == ["--repository", "/data/models"]
    dockerfile = (DOCKER / "trt-build.Dockerfile").read_text()
    assert "COPY scripts/build-trt-plans.sh scripts/" in dockerfile and "WORKDIR /app" in dockerfile
    assert (PROJECT_ROOT / "scripts" / "build-trt-plans.sh").is_file()
    assert str(init["resources"]["limits"]["nvidia.com/gpu"]) == "1"
    assert init["securityContext"]["runAsUser"] == 10001, "the owner of the model folders"
    init_mounts = {m["mountPath"]: m for m in init["volumeMounts"]}
    assert not init_mounts["/data"].get("readOnly", False)
    volumes = {v["name"]: v for v in spec["volumes"]}
    claim = volumes[init_mounts["/data"]["name"]]["persistentVolumeClaim"]
    assert claim == {"claimName": "imagen-models", "readOnly": False}
    mounts = {m["mountPath"]: m for m in container(triton, "triton")["volumeMounts"]}
    assert mounts["/data"]["readOnly"] is True
    cache = mounts[ServingOptions.trt_cache_dir]
    assert not cache.get("readOnly", False)
    assert (cache["name"], cache["subPath"]) == (mounts["/data"]["name"], "trt-cache"), "on the models volume"
    assert 10001 in spec["securityContext"]["supplementalGroups"]
    # Still the GPU overlay underneath.
    assert container(triton, "triton")["image"].endswith("-gpu")


def test_cpu_overlay_exports_the_demo_only_into_an_empty_repository(tmp_path: Path) -> None:
    job = one(render("overlays/cpu"), "Job", "imagen-export-demo")
    ctr = container(job, "export")
    mounts = {m["mountPath"]: m for m in ctr["volumeMounts"]}
    assert not mounts["/data"].get("readOnly", False)
    assert pod_spec(job)["securityContext"]["fsGroup"] == 10001
    _check_export_once_script(ctr["command"], ctr["args"], tmp_path)


# --- compose ------------------------------------------------------------------------------------------------------

_VARIABLE = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::?-([^}]*))?\}")


def interpolate(value: Any) -> Any:
    """Compose's interpolation with every variable unset: `${X:-default}` -> default, `$$` -> `$`."""
    if isinstance(value, str):
        return _VARIABLE.sub(lambda m: "$" if m.group(0) == "$$" else (m.group(2) or ""), value)
    if isinstance(value, list):
        return [interpolate(v) for v in value]
    if isinstance(value, dict):
        return {k: interpolate(v) for k, v in value.items()}
    return value


@cache
def compose() -> dict[str, Any]:
    raw = yaml.safe_load(COMPOSE.read_text())
    unresolved = [m.group(1) for m in _VARIABLE.finditer(COMPOSE.read_text()) if m.group(1) and m.group(2) is None]
    assert not unresolved, f"variables without a default: {unresolved}"
    return dict(interpolate(raw))


def services(profile: str | None) -> dict[str, dict[str, Any]]:
    """The services `docker compose [--profile P] up` considers: those without a profile, and P's."""
    return {
        name: svc
        for name, svc in compose()["services"].items()
        if not svc.get("profiles") or (profile is not None and profile in svc["profiles"])
    }


def environment(svc: dict[str, Any]) -> dict[str, str]:
    env = svc.get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in env.items()}


def named_volumes(svc: dict[str, Any]) -> list[tuple[str, str, bool]]:
    """(volume, target, read_only) of the service's named-volume mounts (short syntax)."""
    found = []
    for entry in svc.get("volumes", []):
        source, target, *mode = entry.split(":")
        if not source.startswith((".", "/", "~")):
            found.append((source, target, "ro" in mode))
    return found


def gateway_services(profile: str | None) -> dict[str, dict[str, Any]]:
    return {n: s for n, s in services(profile).items() if s.get("image", "").startswith("imagen-gateway:")}


def _scale_gateways() -> dict[str, dict[str, Any]]:
    return {n: s for n, s in gateway_services("scale").items() if "scale" in s.get("profiles", [])}


def test_compose_references_are_defined() -> None:
    spec = compose()
    for name, svc in spec["services"].items():
        for volume, _, _ in named_volumes(svc):
            assert volume in spec["volumes"], f"{name}: volume {volume} is not defined"
        for secret in svc.get("secrets", []):
            secret_name = secret if isinstance(secret, str) else secret["source"]
            assert secret_name in spec["secrets"], f"{name}: secret {secret_name} is not defined"
        for config in svc.get("configs", []):
            assert config["source"] in spec["configs"], f"{name}: config {config} is not defined"
        for dependency, condition in svc.get("depends_on", {}).items():
            assert dependency in spec["services"], f"{name} depends on unknown {dependency}"
            # A required dependency must be active whenever the dependent is.
            if condition.get("required", True):
                for profile in svc.get("profiles") or [None]:
                    assert dependency in services(profile), f"{name} ({profile}) needs {dependency}"


def test_compose_single_gateway_keeps_jobs_and_secret_off_the_read_only_root() -> None:
    """The default stack: one gateway on SQLite, its database on a writable named volume (the root filesystem is
    read-only), the webhook secret from a compose secret (never generated into the container)."""
    (gateway,) = gateway_services(None).values()
    assert gateway["read_only"] is True
    env = environment(gateway)
    jobs_db = Path(env["IMAGEN_JOBS_DB"])
    assert jobs_db.suffix == ".sqlite3"
    writable = [target for _, target, ro in named_volumes(gateway) if not ro]
    assert str(jobs_db.parent) in writable, "the SQLite folder (db, -wal, -shm) must be a writable volume"
    # Its folder exists in the image, owned by the service user: a fresh volume mounted there copies the owner.
    assert str(jobs_db.parent) in (DOCKER / "gateway.Dockerfile").read_text()
    assert env.get("IMAGEN_WORKERS", "1") == "1", "SQLite serves one process"
    _check_webhook_secret_from_secret(gateway)
    assert Path(env["IMAGEN_API_KEYS_FILE"]).name in gateway["secrets"]
    assert "IMAGEN_WEBHOOK_SECRET" not in env, "a secret value in the environment block"


def _check_webhook_secret_from_secret(svc: dict[str, Any]) -> None:
    assert "webhook_secret" in svc["secrets"]
    script = " ".join(svc["entrypoint"])
    assert "IMAGEN_WEBHOOK_SECRET=$(cat /run/secrets/webhook_secret)" in script
    assert svc["command"][:3] == ["python", "-m", "gateway"]


def test_compose_gateway_entrypoint_exports_the_secret_and_execs(tmp_path: Path) -> None:
    """The entrypoint, run by sh as the container would: IMAGEN_WEBHOOK_SECRET from the secret file (trailing
    newline dropped), then the command; an empty or missing secret stops it."""
    (gateway,) = gateway_services(None).values()
    _shell, flags, script, name = gateway["entrypoint"]
    secret = tmp_path / "webhook_secret"
    script = script.replace("/run/secrets/webhook_secret", str(secret))
    run = [shutil.which("sh") or "/bin/sh", flags, script, name, "sh", "-c", 'printf %s "$IMAGEN_WEBHOOK_SECRET"']
    secret.write_text("s3cr3t-value\n")
    result = subprocess.run(run, capture_output=True, text=True, timeout=10, check=False)
    assert (result.returncode, result.stdout) == (0, "s3cr3t-value"), result.stderr
    secret.write_text("\n")
    result = subprocess.run(run, capture_output=True, text=True, timeout=10, check=False)
    assert result.returncode == 2 and "empty" in result.stderr
    secret.unlink()
    result = subprocess.run(run, capture_output=True, text=True, timeout=10, check=False)
    assert result.returncode != 0 and result.stdout == ""


def test_compose_scale_profile() -> None:
    scale = services("scale")
    images = {name: svc.get("image", "") for name, svc in scale.items()}
    assert images["postgres"].startswith("postgres:16")
    assert images["redis"].startswith("redis:7")
    assert images["triton"].startswith("imagen-triton:")
    assert "export-once" in scale
    gateways = _scale_gateways()
    assert len(gateways) >= 2, f"the scale profile needs at least two gateways, has {sorted(gateways)}"
    base_urls, stores = set(), set()
    for name, svc in gateways.items():
        env = environment(svc)
        assert env["IMAGEN_JOBS_DB"].startswith("postgresql://"), name
        assert "@postgres:5432/" in env["IMAGEN_JOBS_DB"], name
        assert env["IMAGEN_REDIS_URL"].startswith("redis://redis:"), name
        assert env["IMAGEN_TRITON_URL"] == "triton:8001", name
        _check_webhook_secret_from_secret(svc)
        for dependency in ("postgres", "redis", "triton"):
            assert svc["depends_on"][dependency]["condition"] == "service_healthy", (name, dependency)
        assert svc["depends_on"]["export-once"]["condition"] == "service_completed_successfully"
        assert svc["read_only"] is True
        assert "ports" not in svc, "scale gateways are reached through the load balancer"
        base_urls.add(env["IMAGEN_PUBLIC_BASE_URL"])
        store = env["IMAGEN_STORAGE_URL"]
        if not store.startswith("s3://"):  # a folder: it must be a volume all of them mount
            (volume,) = [v for v, target, ro in named_volumes(svc) if target == store and not ro]
            store = f"volume:{volume}"
        stores.add(store)
    assert len(base_urls) == 1, "every replica renders the same image URLs"
    assert len(stores) == 1, "every replica reads and writes the same image store"
    # The load balancer sends to every scale gateway, and is the only published port of the profile.
    lb = scale["lb"]
    config = compose()["configs"][lb["configs"][0]["source"]]["content"]
    upstreams = set(re.findall(r"server\s+([\w.-]+):8080", config))
    assert upstreams == set(gateways)
    assert set(lb["depends_on"]) == set(gateways)
    assert lb["ports"][0].rsplit(":", 2)[1] in next(iter(base_urls))
    # Secrets stay out of the state that is shared: postgres data on its own volume.
    assert ("pgdata", "/var/lib/postgresql/data", False) in named_volumes(scale["postgres"])


def test_compose_export_once_skips_a_repository_with_a_pipeline(tmp_path: Path) -> None:
    svc = compose()["services"]["export-once"]
    assert ("models", "/data", False) in named_volumes(svc)
    _check_export_once_script(svc["entrypoint"], svc["command"], tmp_path)


def test_compose_tensorrt_profile_builds_the_plans_before_triton() -> None:
    """`--profile tensorrt`: the trt-build one-shot (GPU, the models volume writable, the build script as its
    entrypoint) must complete before triton starts; without the profile triton does not wait for it."""
    from export.repository import ServingOptions

    spec = compose()
    build, triton = spec["services"]["trt-build"], spec["services"]["triton"]
    assert build["profiles"] == ["tensorrt"] and "trt-build" not in services(None)
    assert triton["depends_on"]["trt-build"] == {"condition": "service_completed_successfully", "required": False}
    assert build["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    assert ("models", "/data", False) in named_volumes(build)
    dockerfile = (DOCKER / "trt-build.Dockerfile").read_text()
    assert 'ENTRYPOINT ["/app/scripts/build-trt-plans.sh", "--repository", "/data/models"]' in dockerfile
    assert build["build"]["dockerfile"] == "docker/trt-build.Dockerfile"
    # The caches: one writable volume at the export's cache folder, in both; triton may write through its group.
    cache = ServingOptions.trt_cache_dir
    (volume,) = [v for v, target, ro in named_volumes(triton) if target == cache and not ro]
    assert (volume, cache, False) in named_volumes(build)
    assert "10001" in triton["group_add"]
    assert "chown 1000:10001 /data/trt-cache && chmod 2775 /data/trt-cache" in dockerfile
    assert (
        "chown 1000:10001 /data/trt-cache && chmod 2775 /data/trt-cache" in (DOCKER / "triton.Dockerfile").read_text()
    )


def _check_export_once_script(command: list[str], args: list[str], tmp_path: Path) -> None:
    """Run the one-shot export's wrapper with `python -m export` swapped for `echo`: it skips a repository that
    holds a manifest and runs the export (with its arguments) into an empty one."""
    shell, flags, script, name = command
    assert shell == "/bin/sh"
    script = script.replace("/data/models", str(tmp_path / "models")).replace("exec python -m export", "exec echo")
    run = [shutil.which("sh") or "/bin/sh", flags, script, name, *args]
    result = subprocess.run(run, capture_output=True, text=True, timeout=10, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["--output", str(tmp_path / "models"), *args]
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "imagen-v2.pipeline.json").write_text("{}")
    result = subprocess.run(run, capture_output=True, text=True, timeout=10, check=False)
    assert result.returncode == 0 and "nothing to do" in result.stdout


def _compose_plugin() -> str | None:
    """The docker CLI, if its compose plugin is installed (`config` needs no engine)."""
    docker = shutil.which("docker")
    if docker is None:
        return None
    probe = subprocess.run([docker, "compose", "version"], capture_output=True, text=True, timeout=30, check=False)
    return docker if probe.returncode == 0 else None


@pytest.mark.parametrize("profile", [None, "scale", "export"])
def test_docker_compose_config(profile: str | None, tmp_path: Path) -> None:
    docker = _compose_plugin()
    if docker is None:
        pytest.skip("no `docker compose` plugin here; the checks above parse compose.yaml instead")
    keys, secret = tmp_path / "api_keys.txt", tmp_path / "webhook_secret.txt"
    keys.write_text("key\n")
    secret.write_text("secret\n")
    env = {"PATH": os.environ.get("PATH", ""), "HOME": str(tmp_path)}
    env |= {"IMAGEN_API_KEYS_HOST_FILE": str(keys), "IMAGEN_WEBHOOK_SECRET_HOST_FILE": str(secret)}
    argv = [docker, "compose", "-f", str(COMPOSE), *(["--profile", profile] if profile else []), "config"]
    result = subprocess.run(
        [*argv, "--format", "json"], capture_output=True, text=True, env=env, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    rendered = json.loads(result.stdout)
    assert set(rendered["services"]) == set(services(profile))
