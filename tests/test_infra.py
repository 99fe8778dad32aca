"""infra/: the Kubernetes manifests (schema-level checks, no cluster needed) and the local
stack scripts (a real Ray head, MLflow server and Prefect server started and stopped)."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "infra" / "k8s"
LOCAL = ROOT / "infra" / "local"
MANIFESTS = sorted(p for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")
WORKLOAD_KINDS = {"Deployment", "StatefulSet"}


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


# --- infra/k8s: schema-level validation ----------------------------------------------------


def test_manifests_present():
    names = {p.name for p in MANIFESTS}
    assert {"raycluster.yaml", "rayjob.yaml", "mlflow.yaml", "prefect.yaml"} <= names
    assert (K8S / "kustomization.yaml").is_file()
    assert (K8S / "README.md").is_file()
    assert (LOCAL / "README.md").is_file()


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


RAYCLUSTERS = _of_kind("RayCluster")


def _check_ray_cluster_spec(spec: dict) -> None:
    head = spec["headGroupSpec"]["template"]
    head_containers = _containers(head)
    assert head_containers and all(c.get("image") for c in head_containers)
    groups = spec["workerGroupSpecs"]
    assert groups, "no worker groups"
    for g in groups:
        assert g.get("groupName")
        lo, n, hi = g["minReplicas"], g["replicas"], g["maxReplicas"]
        assert all(isinstance(v, int) for v in (lo, n, hi)), g["groupName"]
        assert 0 <= lo <= n <= hi, f"{g['groupName']}: replicas {lo} <= {n} <= {hi} broken"
        containers = _containers(g["template"])
        assert containers, g["groupName"]
        for c in containers:
            assert c.get("image"), f"{g['groupName']}: container without image"
            assert c.get("resources", {}).get("limits"), f"{g['groupName']}: no resource limits"


@pytest.mark.parametrize("doc", [d for _, d in RAYCLUSTERS], ids=_ids(RAYCLUSTERS))
def test_raycluster_schema(doc: dict):
    assert doc["apiVersion"] == "ray.io/v1"
    _check_ray_cluster_spec(doc["spec"])


def _gpu_of(group: dict) -> int:
    n = 0
    for c in _containers(group["template"]):
        n += int(c.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0))
    return n


@pytest.mark.parametrize("doc", [d for _, d in RAYCLUSTERS], ids=_ids(RAYCLUSTERS))
def test_raycluster_cpu_and_gpu_groups(doc: dict):
    groups = {g["groupName"]: g for g in doc["spec"]["workerGroupSpecs"]}
    assert {"cpu-workers", "gpu-workers"} <= set(groups)
    assert _gpu_of(groups["gpu-workers"]) >= 1, "gpu-workers requests no nvidia.com/gpu"
    assert _gpu_of(groups["cpu-workers"]) == 0


def test_one_raycluster_at_least():
    assert RAYCLUSTERS, "no RayCluster manifest"


RAYJOBS = _of_kind("RayJob")


@pytest.mark.parametrize("doc", [d for _, d in RAYJOBS], ids=_ids(RAYJOBS))
def test_rayjob_schema(doc: dict):
    spec = doc["spec"]
    assert doc["apiVersion"] == "ray.io/v1"
    assert "fcn" in spec["entrypoint"].split()[0], spec["entrypoint"]
    assert "--config" in spec["entrypoint"]
    assert ("rayClusterSpec" in spec) != ("clusterSelector" in spec), \
        "a RayJob needs exactly one of rayClusterSpec / clusterSelector"
    if "rayClusterSpec" in spec:
        _check_ray_cluster_spec(spec["rayClusterSpec"])
    else:
        wanted = spec["clusterSelector"].get("ray.io/cluster")
        assert wanted in {d["metadata"]["name"] for _, d in RAYCLUSTERS}, \
            f"clusterSelector names no RayCluster of infra/k8s: {wanted}"
    env = yaml.safe_load(spec["runtimeEnvYAML"])["env_vars"]
    assert {"MLFLOW_TRACKING_URI", "PREFECT_API_URL"} <= set(env)


def test_one_rayjob_at_least():
    assert RAYJOBS, "no RayJob manifest"


WORKLOADS = _of_kind(*WORKLOAD_KINDS)


@pytest.mark.parametrize("doc", [d for _, d in WORKLOADS], ids=_ids(WORKLOADS))
def test_workload_schema(doc: dict):
    spec = doc["spec"]
    assert spec["selector"]["matchLabels"] == spec["template"]["metadata"]["labels"]
    containers = _containers(spec["template"])
    assert containers
    for c in containers:
        assert c.get("name") and c.get("image"), f"container without name/image: {c}"


SERVICES = _of_kind("Service")


@pytest.mark.parametrize("doc", [d for _, d in SERVICES], ids=_ids(SERVICES))
def test_service_schema_and_target(doc: dict):
    spec = doc["spec"]
    assert spec.get("selector"), "Service without selector"
    assert spec.get("ports") and all("port" in p for p in spec["ports"])
    # The selector matches the pods of one workload of infra/k8s.
    matches = [d for _, d in WORKLOADS
               if spec["selector"].items() <= d["spec"]["template"]["metadata"]["labels"].items()]
    assert matches, f"Service {doc['metadata']['name']} selects no workload"
    # Named target ports exist on the selected containers.
    port_names = {p.get("name") for d in matches for c in _containers(d["spec"]["template"])
                  for p in c.get("ports", [])}
    for p in spec["ports"]:
        if isinstance(p.get("targetPort"), str):
            assert p["targetPort"] in port_names, f"targetPort {p['targetPort']} not declared"


def test_referenced_secrets_and_claims_exist():
    """Every secretKeyRef/secretRef/PVC a pod uses is defined by the manifests (with the key)."""
    secrets = {d["metadata"]["name"]: {**d.get("stringData", {}), **d.get("data", {})}
               for _, d in _of_kind("Secret")}
    claims = {d["metadata"]["name"] for _, d in _of_kind("PersistentVolumeClaim")}
    claims |= {f"{t['metadata']['name']}" for _, d in _of_kind("StatefulSet")
               for t in d["spec"].get("volumeClaimTemplates", [])}

    def walk(node):
        if isinstance(node, dict):
            if "secretKeyRef" in node:
                ref = node["secretKeyRef"]
                assert ref["name"] in secrets, f"missing Secret {ref['name']}"
                assert ref["key"] in secrets[ref["name"]], f"{ref['name']} lacks {ref['key']}"
            if "secretRef" in node:
                assert node["secretRef"]["name"] in secrets, node
            if "persistentVolumeClaim" in node:
                assert node["persistentVolumeClaim"]["claimName"] in claims, node
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    for _, d in _all_docs():
        walk(d)
    auth = [d["spec"]["authOptions"] for _, d in RAYCLUSTERS if "authOptions" in d["spec"]]
    for a in auth:
        if "secretName" in a:
            assert "auth_token" in secrets[a["secretName"]]


def test_mlflow_server_args():
    (mlflow,) = [d for _, d in WORKLOADS if d["metadata"]["name"] == "mlflow"]
    (c,) = _containers(mlflow["spec"]["template"])
    line = " ".join(c.get("command", []) + c.get("args", []))
    assert "mlflow server" in line
    assert "--backend-store-uri=$(MLFLOW_BACKEND_STORE_URI)" in line
    assert "--artifacts-destination=s3://fcn-mlflow/" in line and "--serve-artifacts" in line
    env = {e["name"]: e for e in c["env"]}
    assert env["MLFLOW_BACKEND_STORE_URI"]["valueFrom"]["secretKeyRef"]
    assert env["MLFLOW_S3_ENDPOINT_URL"]["value"].startswith("http://minio:")
    kinds = {d["kind"] for _, d in _all_docs() if d["metadata"]["name"] in {"postgres", "minio"}}
    assert {"StatefulSet", "Deployment", "Service"} <= kinds


def test_prefect_server_and_worker():
    by_name = {d["metadata"]["name"]: d for _, d in WORKLOADS}
    server = " ".join(_containers(by_name["prefect-server"]["spec"]["template"])[0]["command"])
    assert server.startswith("prefect server start")
    (worker,) = _containers(by_name["prefect-worker"]["spec"]["template"])
    cmd = worker["command"]
    assert cmd[:3] == ["prefect", "worker", "start"]
    assert cmd[cmd.index("--pool") + 1] == "fcn-pool"
    assert cmd[cmd.index("--type") + 1] in {"process", "kubernetes"}
    env = {e["name"]: e.get("value") for e in worker["env"]}
    assert env["PREFECT_API_URL"] == "http://prefect-server:4200/api"
    # KubeRay names the head Service <cluster>-head-svc.
    heads = {f"ray://{d['metadata']['name']}-head-svc:10001" for _, d in RAYCLUSTERS}
    assert env["RAY_ADDRESS"] in heads


def test_kustomization_lists_exactly_the_manifests():
    kust = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert kust["kind"] == "Kustomization"
    listed = kust["resources"]
    assert len(listed) == len(set(listed)), "a resource listed twice"
    for name in listed:
        assert (K8S / name).is_file(), f"kustomization lists a missing file: {name}"
    assert set(listed) == {p.name for p in MANIFESTS}, "a manifest is not in kustomization.yaml"


@pytest.mark.skipif(not shutil.which("kubectl"), reason="kubectl not installed")
def test_kustomize_renders():
    """`kubectl kustomize` (offline) builds the whole set into namespace fcn."""
    r = subprocess.run(["kubectl", "kustomize", str(K8S)], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    rendered = [d for d in yaml.safe_load_all(r.stdout) if d]
    assert len(rendered) == len(_all_docs())
    for d in rendered:
        if d["kind"] != "Namespace":
            assert d["metadata"]["namespace"] == "fcn", d["metadata"]["name"]


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
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("RAY_", "MLFLOW_", "PREFECT_", "FCN_"))}
    env.update(extra)
    return env


def _run(args: list[str], env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(args, env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def _py(code: str, env: dict[str, str], timeout: float = 120):
    """Run CODE in a fresh interpreter; its last stdout line is JSON (libraries print too)."""
    r = _run([sys.executable, "-c", textwrap.dedent(code)], env, timeout)
    assert r.returncode == 0, f"stdout:\n{r.stdout}\nstderr:\n{r.stderr[-4000:]}"
    return json.loads(r.stdout.strip().splitlines()[-1])


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
                  "Progress bars disabled", "Started a local Ray"):
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

        # Idempotent: a second up starts nothing.
        r = _run([up, str(state)], env, timeout=120)
        assert r.returncode == 0 and "already up" in r.stdout, r.stdout + r.stderr
        assert {svc: int((state / f"{svc}.pid").read_text()) for svc in pids} == pids

        # (a) Ray: a driver joins the head (not a Ray of its own) and runs a task.
        res = _py("""
            import json, os, ray
            ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=False)
            answer = ray.get(ray.remote(lambda: 6 * 7).remote())
            print(json.dumps([answer, ray.cluster_resources().get("CPU", 0),
                              ray.get_runtime_context().gcs_address]))
        """, client_env)
        assert res[0] == 42 and res[1] > 0
        assert res[2].endswith(f":{ray_port}")

        # (b) MLflow: experiment, metric and an artifact through the server's artifact proxy.
        res = _py("""
            import json
            import mlflow
            from mlflow import MlflowClient
            c = MlflowClient()
            exp = c.create_experiment("infra-smoke")
            run = c.create_run(exp)
            c.log_metric(run.info.run_id, "miou", 0.625, step=3)
            c.log_text(run.info.run_id, "hello", "notes/a.txt")
            c.set_terminated(run.info.run_id)
            hist = c.get_metric_history(run.info.run_id, "miou")
            path = mlflow.artifacts.download_artifacts(run_id=run.info.run_id,
                                                       artifact_path="notes/a.txt")
            print(json.dumps([hist[0].value, hist[0].step, c.get_run(run.info.run_id).info.status,
                              open(path).read(), run.info.artifact_uri]))
        """, client_env)
        assert res[:3] == [0.625, 3, "FINISHED"]
        assert res[3] == "hello" and res[4].startswith("mlflow-artifacts:")
        stored = list((state / "mlflow" / "artifacts").rglob("a.txt"))
        assert stored and stored[0].read_text() == "hello"

        # (c) Prefect: health, then a flow run that the API reports as completed.
        api = stack["PREFECT_API_URL"]
        with urllib.request.urlopen(f"{api}/health", timeout=10) as resp:
            assert resp.status == 200
        run_id = _py("""
            import json
            from prefect import flow

            @flow(name="infra-smoke")
            def smoke(x: int) -> int:
                return x + 1

            state = smoke(41, return_state=True)
            assert state.result() == 42
            print(json.dumps(str(state.state_details.flow_run_id)))
        """, client_env)
        with urllib.request.urlopen(f"{api}/flow_runs/{run_id}", timeout=10) as resp:
            fr = json.load(resp)
        assert fr["state_type"] == "COMPLETED", fr["state_type"]
        req = urllib.request.Request(
            f"{api}/flow_runs/filter", data=json.dumps({}).encode(), method="POST",
            headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=10) as resp:
            assert run_id in {r["id"] for r in json.load(resp)}

        # (d) The real pipeline (`fcn run`) against the three servers.
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
