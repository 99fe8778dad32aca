"""MLflow model registry: log, register, tag, alias, the champion gate and its history;
model lookup; the dataset a run read.

A registered version is MLflow models-from-code: the ``PythonModel`` of
``pipelines/mlflow_model.py`` (logged as a file), a pickle-free checkpoint as its one artifact
and ``fcn_core`` as code. Loading it unpickles nothing, and ``mlflow.pyfunc.load_model`` (or
``mlflow models serve``) works wherever torch and mlflow are installed: uint8 RGB (N, H, W, 3)
in, int64 class ids (N, H, W) out.

What registration promises:
- Idempotent: a version is keyed by its training run and the sha256 of its checkpoint file,
  tags set in the same call that creates it. ``register`` called again (a retry) reuses the
  version and its logged model and does only the steps still missing.
- Fail closed: ``champion`` moves only after the current champion was read; any error reading
  it (server down, timeout, permission) stops the gate with ``ServiceUnavailable`` and the alias
  stays. Only "no such registered model / no such alias" means there was none.
- History: MLflow keeps no alias history, so each move tags the versions (``champion_since``,
  ``champion_until``, ``replaced_version``, ``replaced_by``); ``model_history`` reads them.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import fcn_core
from fcn_core.serving import checkpoint_input, checkpoint_mean_bgr, net_from_checkpoint
from fcn_core.transforms import INPUTS
from pipelines import storage
from pipelines.errors import ServiceUnavailable, UsageError, UserError
from pipelines.train.checkpoint import CheckpointError, open_checkpoint, read_checkpoint

CANDIDATE, CHAMPION = "candidate", "champion"
MODEL_FILE = Path(__file__).with_name("mlflow_model.py")  # the models-from-code file
# The key of a version: set when it is created, so a retry always finds it.
TRAINING_RUN, DIGEST = "training_run_id", "checkpoint_sha256"
NO_RUN = "-"  # a checkpoint whose training run is not known
DECISION, PROMOTED = "champion_decision", "champion_promoted"
SINCE, UNTIL, REPLACED, REPLACED_BY = ("champion_since", "champion_until", "replaced_version",
                                       "replaced_by")
Log = Callable[[str], None]


class ModelLookupError(UserError, ValueError):
    """A model URI or registered name that does not resolve; the message says why."""


@dataclass(frozen=True)
class LoadedModel:
    net: nn.Module
    mean_bgr: tuple[float, float, float]
    input: str  # rgb | hha | rgbd | rgb-hha
    source: str  # what was loaded, for logs


MLFLOW_SCHEMES = ("models:/", "runs:/", "mlflow-artifacts:/")


def is_mlflow_uri(uri: str) -> bool:
    """An MLflow model URI; anything else (a path, s3://...) is a checkpoint location."""
    return str(uri).startswith(MLFLOW_SCHEMES)


# ------------------------------------------------------------------------ model lookup

def resolve_model(uri: str, tracking_uri: str | None = None) -> LoadedModel:
    """A ``models:/name@alias``, ``models:/name/version``, ``runs:/...`` URI or a checkpoint
    location (folder or checkpoint.pt, local or a URI) -> the net and its input conventions.

    MLflow URIs resolve against ``tracking_uri``, else the project's (``MLFLOW_TRACKING_URI``
    or the SQLite store under the data folder), never MLflow's own default in the current
    folder. A registered model's weights are read from its checkpoint artifact with
    ``weights_only=True``; no code of the model is run."""
    if is_mlflow_uri(uri):
        if tracking_uri is None:
            from pipelines.tracking import tracking_uri as project_tracking_uri

            tracking_uri = project_tracking_uri()
        return _resolve_logged_model(uri, tracking_uri)
    try:
        state = read_checkpoint(uri)
    except CheckpointError as e:
        raise ModelLookupError(f"{e}: expected a models:/ or runs:/ URI or a checkpoint "
                               "folder") from None
    return LoadedModel(net_from_checkpoint(state).eval(), checkpoint_mean_bgr(state),
                       checkpoint_input(state), str(uri))


def _resolve_logged_model(uri: str, tracking_uri: str) -> LoadedModel:
    from pipelines import model_cache

    model_id = model_cache.logged_model_id(uri, tracking_uri)  # no MLflow import
    hit = model_cache.cached(model_id) if model_id else None
    if hit is not None:
        state = read_checkpoint(hit)
        return LoadedModel(net_from_checkpoint(state).eval(), checkpoint_mean_bgr(state),
                           checkpoint_input(state), uri)

    import mlflow.artifacts
    from mlflow.exceptions import MlflowException
    from mlflow.models import Model

    with tempfile.TemporaryDirectory() as d:
        try:
            with _fluent_tracking(tracking_uri):
                local = mlflow.artifacts.download_artifacts(
                    artifact_uri=uri, dst_path=d, tracking_uri=tracking_uri,
                    registry_uri=tracking_uri)
        except MlflowException as e:
            raise ModelLookupError(storage.redact(
                f"cannot load {uri}: {e.message.strip().splitlines()[0]}")) from None
        if not os.path.isfile(os.path.join(local, "MLmodel")):
            raise ModelLookupError(f"cannot load {uri}: it is not an MLflow model (no MLmodel)")
        mlmodel = Model.load(local)
        flavors = mlmodel.flavors
        ckpt = flavors.get("python_function", {}).get("artifacts", {}).get("checkpoint")
        if ckpt:
            path = os.path.join(local, ckpt["path"])
            state = read_checkpoint(path)
            if mlmodel.model_id:
                model_cache.store(str(mlmodel.model_id), path)
            return LoadedModel(net_from_checkpoint(state).eval(), checkpoint_mean_bgr(state),
                               checkpoint_input(state), uri)
        if "pytorch" in flavors:  # registered before models-from-code: a pickle
            raise ModelLookupError(
                f"cannot load {uri}: it is a pickled PyTorch model (registered by an older "
                "version of this project), which is not unpickled: register its checkpoint "
                "again (the version's 'checkpoint' tag names it)")
        raise ModelLookupError(f"cannot load {uri}: not an FCN model of this project (no "
                               "checkpoint artifact)")


# ------------------------------------------------------------------------ registration

def _signature(input: str = "rgb") -> Any:
    """(N, H, W, C) images of the net's ``input`` (``fcn_core.transforms.INPUTS``) ->
    int64 class ids (N, H, W)."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Schema, TensorSpec

    names, dtype = INPUTS[input]
    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(dtype), (-1, -1, -1, len(names)))]),
        outputs=Schema([TensorSpec(np.dtype(np.int64), (-1, -1, -1))]))


def _input_example(input: str) -> np.ndarray:
    names, dtype = INPUTS[input]
    return np.zeros((1, 32, 32, len(names)), np.dtype(dtype))


def pip_requirements(variant: str = "") -> list[str]:
    """Pinned, so MLflow does not spend 8-18 s inferring them. The GoogLeNet FCN (its
    inception blocks) and the successors (DeepLabv3, ...) are built by torchvision."""
    import mlflow

    reqs = [f"torch=={torch.__version__.split('+')[0]}", f"mlflow=={mlflow.__version__}",
            f"numpy=={np.__version__}"]
    from fcn_core.models import NAMES, needs_torchvision

    if variant in NAMES and needs_torchvision(variant):
        import torchvision

        reqs.append(f"torchvision=={torchvision.__version__.split('+')[0]}")
    return reqs


@dataclass(frozen=True)
class Registration:
    name: str
    version: str
    run_id: str  # the evaluation (or register) run the model was logged to
    champion: bool  # whether this version took the champion alias
    decision: str  # why, with both numbers
    reused: bool = False  # an earlier call had registered this run + checkpoint already


def _quoted(value: str, what: str) -> str:
    """``value`` for an MLflow filter string (which has no escape for a quote)."""
    if "'" in value:
        raise UsageError(f"{what} must not contain a quote ('), got {value!r}")
    return f"'{value}'"


def flow_run_id() -> str | None:
    """The Prefect flow run this process works for, if any. ``pipelines`` never imports
    Prefect: read its runtime only when a flow already imported it, else the variable Prefect
    sets in the processes it starts for a deployment's runs."""
    runtime = sys.modules.get("prefect.runtime.flow_run")
    if runtime is not None:
        try:
            value = runtime.id
        except Exception:  # outside a flow run context: Prefect's lookups may raise
            value = None
        if value:
            return str(value)
    return os.environ.get("PREFECT__FLOW_RUN_ID") or None


def find_training_run(client: Any, checkpoint: str, experiment: str) -> str | None:
    """The stage run that logged ``checkpoint`` (its ``checkpoint`` tag, set by training),
    in ``experiment``; None when it is not known there."""
    exp = client.get_experiment_by_name(experiment)
    if exp is None or "'" in checkpoint:
        return None
    found = client.search_runs([exp.experiment_id], f"tags.checkpoint = '{checkpoint}'",
                               max_results=1)
    return found[0].info.run_id if found else None


def _versions(client: Any, filter_string: str) -> list[Any]:
    out: list[Any] = []
    token = None
    while True:
        page = client.search_model_versions(filter_string, page_token=token)
        out += list(page)
        token = page.token
        if not token:
            return out


def _versions_of(client: Any, name: str) -> list[Any]:
    return _versions(client, f"name = {_quoted(name, 'model name')}")


def find_version(client: Any, name: str, training_run: str, digest: str) -> Any | None:
    """The version of ``name`` registered from this training run and checkpoint, if any."""
    found = [mv for mv in _versions(client, f"name = {_quoted(name, 'model name')} and "
                                            f"tags.{DIGEST} = '{digest}'")
             if mv.tags.get(TRAINING_RUN) == training_run]
    return min(found, key=lambda mv: int(mv.version)) if found else None


def _register_run(client: Any, name: str, digest: str, manifest: Mapping[str, Any]) -> str:
    """The run a registration without an evaluation run logs to, found again on a retry."""
    from pipelines.tracking import experiment_id

    exp = experiment_id(client, f"fcn-{manifest['dataset']}")
    query = (f"tags.register_model = {_quoted(name, 'model name')} and "
             f"tags.{DIGEST} = '{digest}'")
    found = client.search_runs([exp], query, max_results=1)
    if found:
        return found[0].info.run_id
    return client.create_run(exp, run_name=f"register-{name}",
                             tags={"register_model": name, DIGEST: digest}).info.run_id


def _logged_model(client: Any, run_id: str, digest: str) -> str | None:
    """The model id of a complete model logged to ``run_id`` from this checkpoint (a retry
    after log_model and before the version was created), if any."""
    exp = client.get_run(run_id).info.experiment_id
    for m in client.search_logged_models([exp], filter_string=f"tags.{DIGEST} = '{digest}'"):
        if m.source_run_id == run_id and str(m.status).endswith("READY"):
            return m.model_id
    return None


@contextmanager
def _fluent_tracking(uri: str) -> Iterator[None]:
    """MLflow's global tracking URI set to ``uri`` for calls that read it whatever they are
    given (``log_model``; ``create_model_version`` and ``download_artifacts`` of a
    ``models:/`` URI look models up through the global client), then put back.
    ``mlflow.set_tracking_uri`` also exports MLFLOW_TRACKING_URI, which this project reads as
    "the user chose a server" (experiments created then would put their artifacts in
    ./mlruns): the variable keeps its value throughout."""
    import mlflow
    from mlflow.tracking._tracking_service import utils

    env = os.environ.get("MLFLOW_TRACKING_URI")

    def restore_env() -> None:
        if env is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = env

    before = getattr(utils, "_tracking_uri", None)
    mlflow.set_tracking_uri(uri)
    restore_env()
    try:
        yield
    finally:
        mlflow.set_tracking_uri(before)
        restore_env()


def _log_model(uri: str, run_id: str, state: dict[str, Any],
               mean: tuple[float, float, float], key: dict[str, str]) -> str:
    """Log the models-from-code model to ``run_id``; returns its model id."""
    import mlflow
    import mlflow.pyfunc

    from pipelines import model_cache
    from pipelines.train.checkpoint import write_serving_checkpoint

    with tempfile.TemporaryDirectory() as d, _fluent_tracking(uri), \
            mlflow.start_run(run_id=run_id):
        ckpt = write_serving_checkpoint(state, mean, d)
        info = mlflow.pyfunc.log_model(
            name="model", python_model=str(MODEL_FILE), artifacts={"checkpoint": ckpt},
            code_paths=[str(Path(fcn_core.__file__).parent)],
            signature=_signature(checkpoint_input(state)),
            input_example=_input_example(checkpoint_input(state)),
            pip_requirements=pip_requirements(str(state["arch"].get("variant", ""))), tags=key)
        model_cache.store(str(info.model_id), ckpt)  # predicting from it needs no download
    return str(info.model_id)


def _create_version(client: Any, name: str, model_id: str, run_id: str,
                    key: dict[str, str]) -> Any:
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(name)
    except MlflowException as e:
        if e.error_code not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
            raise
    return client.create_model_version(name, source=f"models:/{model_id}", run_id=run_id,
                                       tags=key, model_id=model_id)


def register(checkpoint: str, *, name: str, metrics: dict[str, float], split: str,
             manifest: dict[str, Any], config_digest: str, run_id: str | None = None,
             evaluate_champion: Callable[[str], float] | None = None, log: Log = print,
             training_run_id: str | None = None, flow_run: str | None = None
             ) -> Registration:
    """Log the checkpoint's net as an MLflow model, register it as a version of ``name``
    (or find the version an earlier call registered from the same training run and
    checkpoint), tag its lineage, point ``candidate`` at it, and run the champion gate.

    ``run_id`` is the evaluation run whose ``metrics`` are given (the model is logged to
    it); ``training_run_id`` the stage run that wrote the checkpoint (looked up by its
    ``checkpoint`` tag when not given); ``flow_run`` the Prefect flow run (``flow_run_id()``
    when not given). ``evaluate_champion(uri) -> mean IU`` re-scores the current champion on
    ``split`` when its recorded score is for another split or dataset version.
    """
    from mlflow.tracking import MlflowClient

    from pipelines.tracking import tracking_uri

    if is_mlflow_uri(checkpoint):
        raise UsageError(f"register takes a training checkpoint (a folder or checkpoint.pt), "
                         f"got the MLflow URI {checkpoint}")
    _quoted(name, "model name")
    ck = open_checkpoint(checkpoint)
    uri = tracking_uri()
    with _fluent_tracking(uri):  # log_model and create_model_version read MLflow's global
        client = MlflowClient(uri)
        training = training_run_id or find_training_run(
            client, storage.as_location(checkpoint), f"fcn-{manifest['dataset']}") or NO_RUN
        key = {TRAINING_RUN: training, DIGEST: ck.sha256}
        mv = find_version(client, name, training, ck.sha256)
        reused = mv is not None
        if mv is not None and mv.tags.get(DECISION):  # every step was done: write nothing
            decision = _champion_now(client, name, mv.tags[DECISION])
            log(f"{name} version {mv.version} was registered from this checkpoint already; "
                f"{decision}")
            return Registration(name, str(mv.version), str(run_id or mv.run_id),
                                mv.tags.get(PROMOTED) == "true", decision, True)
        if mv is None:
            mv = _new_version(client, uri, name, ck.state, key, run_id, manifest)
        run_id = run_id or str(mv.run_id)
        version = str(mv.version)
        tags = _lineage_tags(ck.state["arch"], manifest, metrics, split, config_digest,
                             storage.redact(storage.as_location(checkpoint)), run_id,
                             flow_run or flow_run_id() or NO_RUN)
        tags["input"] = checkpoint_input(ck.state)  # what its pyfunc takes (INPUTS)
        for k, v in tags.items():  # only what is missing or different (a retry)
            if mv.tags.get(k) != v:
                client.set_model_version_tag(name, version, k, v)
        client.set_registered_model_alias(name, CANDIDATE, version)
        took, decision = gate_champion(client, name, version, metrics["mean_iu"], split,
                                       tags["dataset_fingerprint"], evaluate_champion)
        client.set_tag(run_id, "registered_model", f"{name}/{version}")
        client.set_tag(run_id, DECISION, decision)
        client.log_metric(run_id, "champion_gate_new_mean_iu", metrics["mean_iu"])
    log(f"registered {name} version {version} (alias {CANDIDATE}"
        f"{', reused' if reused else ''}); {decision}")
    return Registration(name, version, run_id, took, decision, reused)


def _champion_now(client: Any, name: str, then: str) -> str:
    """What a repeated registration says: where ``champion`` points now (the decision
    recorded at the time, ``then``, may be old: "there was none"), or ``then`` when the
    registry cannot say."""
    from mlflow.exceptions import MlflowException

    try:
        champ = read_champion(client, name)
    except (MlflowException, OSError):
        return f"its champion gate then: {then}"
    if champ is None:
        return "no version holds the champion alias now"
    try:
        score = (f" (mean IU {float(champ.tags['mean_iu']):.4f} on "
                 f"{champ.tags.get('eval_split', '?')})")
    except (KeyError, ValueError):  # registered by hand, without our tags
        score = ""
    return f"champion now: version {champ.version}{score}"


def _new_version(client: Any, uri: str, name: str, state: dict[str, Any],
                 key: dict[str, str], run_id: str | None, manifest: Mapping[str, Any]) -> Any:
    """Log the model (unless a failed attempt logged it already) and create the version,
    its key tags set in the same call."""
    run_id = run_id or _register_run(client, name, key[DIGEST], manifest)
    model_id = _logged_model(client, run_id, key[DIGEST]) or _log_model(
        uri, run_id, state, checkpoint_mean_bgr(state), key)
    return _create_version(client, name, model_id, run_id, key)


def _lineage_tags(arch: Mapping[str, Any], manifest: Mapping[str, Any],
                  metrics: Mapping[str, float], split: str, config_digest: str,
                  checkpoint: str, evaluation_run: str, flow_run: str) -> dict[str, str]:
    """What a version is and where it came from (its key tags are set at creation)."""
    from fcn_core.fcn import VARIANTS

    variant = str(arch["variant"])
    if variant in VARIANTS:
        trunk, stage = "vgg16", variant.removeprefix("fcn")
    elif variant.startswith("fcn32s_"):  # the paper's other trunks
        trunk, stage = variant.split("_", 1)[1], "32s"
    else:  # a successor, trained in one stage: deeplabv3_resnet50 -> resnet50
        trunk = {"unet": "none", "segnet": "vgg16_bn", "deeplab_largefov": "vgg16"}.get(
            variant, variant.split("_", 1)[-1])
        stage = "train"
    tags = {"variant": variant, "arch": variant, "backbone": trunk, "stage": stage,
            "width": str(arch["width"]), "dataset": manifest["dataset"],
            "dataset_fingerprint": manifest["source"]["fingerprint"],
            "dataset_version": manifest["version"], "config_digest": config_digest,
            "eval_split": split, "checkpoint": checkpoint,
            "evaluation_run_id": evaluation_run, "prefect_flow_run_id": flow_run}
    # Full precision: the gate compares these numbers, and a rounded tag would make a
    # re-registered identical model lose the tie it should win.
    tags.update({k: repr(float(v)) for k, v in metrics.items() if isinstance(v, float)})
    return tags


# ------------------------------------------------------------------------ the gate

def read_champion(client: Any, name: str) -> Any | None:
    """The version ``champion`` points at, or None when there is none: no registered model
    ``name`` (RESOURCE_DOES_NOT_EXIST), or a registered model whose aliases, read without
    error, do not include it. Every other error propagates: the caller fails closed."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException as e:
        if e.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        if e.error_code != "INVALID_PARAMETER_VALUE":  # how MLflow says "no such alias"
            raise
    try:  # make sure: an absent alias must be seen, never inferred from an error
        aliases = client.get_registered_model(name).aliases
    except MlflowException as e:
        if e.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise
    if CHAMPION in aliases:
        return client.get_model_version(name, str(aliases[CHAMPION]))
    return None


def _cause(exc: BaseException) -> str:
    """A short cause for a failed registry call: MLflow's own messages for a server that
    does not answer run to several hundred characters of urllib3 detail."""
    import re

    code = getattr(exc, "error_code", "") or ""
    text = (getattr(exc, "message", None) or str(exc)).strip()
    if m := re.search(r"too many (\d{3}) error responses", text):
        return f"HTTP {m.group(1)}, after retries"
    for needle, short in (("Connection refused", "connection refused"),
                          ("timed out", "timed out"), ("timeout", "timed out"),
                          ("Name or service not known", "unknown host")):
        if needle in text:
            return short
    first = text.splitlines()[0] if text else type(exc).__name__
    first = first if len(first) <= 160 else first[:157] + "..."
    return f"{code}: {first}" if code and code != "INTERNAL_ERROR" else first


def _unreadable(client: Any, name: str, version: str, exc: BaseException
                ) -> ServiceUnavailable:
    """The gate's one-line error: what failed, that the alias did not move, what to do."""
    registry = getattr(client, "_registry_uri", None) or getattr(client, "tracking_uri", None)
    where = f" at {registry}" if registry else ""
    err = ServiceUnavailable(storage.redact(
        f"champion gate of {name} stopped: cannot read the current champion from the MLflow "
        f"registry{where} ({_cause(exc)}); alias {CHAMPION} did not move (version {version} "
        f"is registered, alias {CANDIDATE}): register it again when the server answers"))
    err.transient = getattr(exc, "error_code", "") not in ("PERMISSION_DENIED",
                                                           "UNAUTHENTICATED")
    return err


def gate_champion(client: Any, name: str, version: str, mean_iu: float, split: str,
                  fingerprint: str, evaluate_champion: Callable[[str], float] | None = None
                  ) -> tuple[bool, str]:
    """Move ``champion`` to ``version`` only if its mean IU is at least the champion's on
    the same split (ties go to the newer model). A worse model never takes the alias, and
    neither does any model when the champion cannot be read (``ServiceUnavailable``).
    Returns (whether it moved, the decision with both numbers)."""
    from mlflow.exceptions import MlflowException

    try:
        champ = read_champion(client, name)
    except (MlflowException, OSError) as e:  # requests' errors are OSErrors
        raise _unreadable(client, name, version, e) from None
    if champ is None:
        _promote(client, name, version)
        decision = f"champion: version {version} (mean IU {mean_iu:.4f}; there was none)"
        _record(client, name, version, decision, True, None)
        return True, decision
    if str(champ.version) == str(version):  # a retry after the alias moved
        _promote(client, name, version)
        decision = f"champion: version {version} (mean IU {mean_iu:.4f}; already the champion)"
        _record(client, name, version, decision, True, None)
        return True, decision
    same = champ.tags.get("eval_split") == split and \
        champ.tags.get("dataset_fingerprint") == fingerprint and "mean_iu" in champ.tags
    if same:
        champ_iu = float(champ.tags["mean_iu"])
    elif evaluate_champion is not None:
        champ_iu = float(evaluate_champion(f"models:/{name}/{champ.version}"))
    else:
        raise ValueError(f"champion version {champ.version} was scored on another split or "
                         "dataset version and no evaluator was given to re-score it")
    if mean_iu >= champ_iu:
        _promote(client, name, version)
        decision = (f"champion: version {version} (mean IU {mean_iu:.4f} >= "
                    f"{champ_iu:.4f} of version {champ.version})")
        took = True
    else:
        decision = (f"champion stays version {champ.version} (mean IU {champ_iu:.4f} > "
                    f"{mean_iu:.4f} of version {version})")
        took = False
    _record(client, name, version, decision, took, champ_iu)
    return took, decision


def _now() -> str:
    """UTC, to the millisecond: sorts as text, reads as a time."""
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _promote(client: Any, name: str, version: str) -> None:
    """Point ``champion`` at ``version``, then write the history MLflow does not keep: the
    version's ``champion_since`` and each earlier champion's ``champion_until``. Alias
    first: a crash in between loses a history line, never claims a move that did not happen,
    and a retry (``already the champion``) writes what is missing."""
    client.set_registered_model_alias(name, CHAMPION, version)
    now = _now()
    reigns = {str(mv.version): mv for mv in _versions_of(client, name)
              if mv.tags.get(SINCE) and not mv.tags.get(UNTIL)}
    replaced = sorted((v for v in reigns if v != str(version)), key=int)
    for v in replaced:
        client.set_model_version_tag(name, v, UNTIL, now)
        client.set_model_version_tag(name, v, REPLACED_BY, str(version))
    if str(version) in reigns:
        return  # its reign is recorded already
    mv = client.get_model_version(name, version)
    for stale in (UNTIL, REPLACED_BY):  # champion again (by hand, or a late retry)
        if stale in mv.tags:
            client.delete_model_version_tag(name, version, stale)
    client.set_model_version_tag(name, version, SINCE, now)
    client.set_model_version_tag(name, version, REPLACED, ",".join(replaced) or NO_RUN)


def _record(client: Any, name: str, version: str, decision: str, took: bool,
            champ_iu: float | None) -> None:
    """The decision on the version; written last, it marks the registration complete."""
    if champ_iu is not None:
        client.set_model_version_tag(name, version, "champion_mean_iu_at_gate",
                                     repr(float(champ_iu)))
    client.set_model_version_tag(name, version, PROMOTED, "true" if took else "false")
    client.set_model_version_tag(name, version, DECISION, decision)


# ------------------------------------------------------------------------ reading back

def _client_for_name(name: str) -> tuple[Any, Any]:
    """(client, registered model) or ModelLookupError naming the model."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from pipelines.tracking import tracking_uri

    client = MlflowClient(tracking_uri())
    try:
        return client, client.get_registered_model(name)
    except MlflowException as e:
        if e.error_code == "RESOURCE_DOES_NOT_EXIST":
            raise ModelLookupError(f"no registered model named {name!r}") from None
        raise ServiceUnavailable(storage.redact(
            f"cannot read registered model {name!r}: {e.message.strip().splitlines()[0]}")
        ) from None


def model_history(name: str) -> list[dict[str, Any]]:
    """Who was champion when, oldest first, from the versions' tags (``fcn models NAME
    --history``): version, since, until (None: still champion), replaced_version,
    replaced_by, mean_iu, split, current, decision. A champion set by hand, outside the
    gate, shows with since None."""
    client, model = _client_for_name(name)
    current = model.aliases.get(CHAMPION)
    rows = []
    for mv in _versions_of(client, name):
        if not mv.tags.get(SINCE) and str(mv.version) != str(current):
            continue
        rows.append({
            "version": str(mv.version), "since": mv.tags.get(SINCE),
            "until": mv.tags.get(UNTIL), "replaced_version": mv.tags.get(REPLACED, NO_RUN),
            "replaced_by": mv.tags.get(REPLACED_BY), "mean_iu": mv.tags.get("mean_iu", "-"),
            "split": mv.tags.get("eval_split", "-"),
            "current": str(mv.version) == str(current),
            "decision": mv.tags.get(DECISION, "alias set outside the champion gate"),
        })
    rows.sort(key=lambda r: (r["since"] is None, r["since"] or "", int(r["version"])))
    return rows


def list_models(name: str | None = None) -> list[dict[str, Any]]:
    """Rows for ``fcn models``: one per version, newest first. Aliases are read from the
    registered model (search_model_versions returns them empty, MLflow issue 9783)."""
    from mlflow.tracking import MlflowClient

    from pipelines.tracking import tracking_uri

    if name:
        client, model = _client_for_name(name)
        models = [model]
    else:
        client = MlflowClient(tracking_uri())
        models = list(client.search_registered_models())
    rows = []
    for model in models:
        by_version: dict[str, list[str]] = {}
        for alias, v in model.aliases.items():
            by_version.setdefault(str(v), []).append(alias)
        for mv in _versions_of(client, model.name):
            rows.append({
                "name": model.name, "version": mv.version,
                "aliases": ",".join(sorted(by_version.get(str(mv.version), []))),
                "stage": mv.tags.get("stage", "-"), "mean_iu": mv.tags.get("mean_iu", "-"),
                "split": mv.tags.get("eval_split", "-"),
                "created": time.strftime("%Y-%m-%d %H:%M",
                                         time.localtime(mv.creation_timestamp / 1000)),
            })
    rows.sort(key=lambda r: (r["name"], -int(r["version"])))
    return rows


# ------------------------------------------------------------------------ dataset lineage

def _manifest_dataset(location: str, manifest: Mapping[str, Any]) -> Any:
    """An MLflow dataset for an ingested dataset: the manifest's URI as source, the source
    fingerprint as digest (its first 36 characters: MLflow's limit; the whole one is in the
    profile), row counts per split as profile, the shard columns as schema."""
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.exceptions import MlflowException
    from mlflow.types.schema import ColSpec, Schema

    class ManifestDataset(MetaDataset):
        def __init__(self, profile: dict[str, Any], **kwargs: Any):
            self._profile = profile
            super().__init__(**kwargs)

        @property
        def profile(self) -> dict[str, Any]:
            return self._profile

        def to_dict(self) -> dict[str, str]:
            import json

            return {**super().to_dict(), "profile": json.dumps(self._profile)}

    try:
        with warnings.catch_warnings():  # file:// is both "local" sources: either is right
            warnings.simplefilter("ignore")
            source = resolve_dataset_source(location)
    except MlflowException:  # a scheme MLflow has no source for: record the URI as code
        from mlflow.data.code_dataset_source import CodeDatasetSource

        source = CodeDatasetSource({"uri": location})
    splits = {s: int(v.get("rows", 0)) for s, v in manifest.get("splits", {}).items()}
    fingerprint = str(manifest["source"]["fingerprint"])
    profile = {"num_rows": sum(splits.values()), "splits": splits, "fingerprint": fingerprint,
               "rejected": int(manifest.get("rejected", 0)),
               "num_classes": int(manifest.get("num_classes", 0)),
               "version": str(manifest.get("version", ""))}
    columns = [ColSpec("string" if c in ("id", "dataset", "split", "sha256") else
                       "long" if c in ("height", "width") else "binary", c)
               for c in manifest.get("columns", [])]
    return ManifestDataset(profile, source=source, name=str(manifest.get("dataset", "dataset")),
                           digest=fingerprint[:36],
                           schema=Schema(columns) if columns else None)


def log_dataset_input(client: Any, run_id: str, manifest_location: str,
                      manifest: Mapping[str, Any], context: str = "training") -> None:
    """Record on ``run_id`` the ingested dataset it read (``mlflow.log_input``'s record,
    written with the client so no run needs to be active): name, the manifest's location,
    digest = the source fingerprint, rows per split. ``client`` is an ``MlflowClient`` or
    the ``mlflow`` module (then its tracking URI is used)."""
    from mlflow.entities import DatasetInput, InputTag
    from mlflow.tracking import MlflowClient

    if not isinstance(client, MlflowClient):  # the mlflow module
        client = MlflowClient(client.get_tracking_uri())
    location = storage.redact(storage.as_location(manifest_location))
    dataset = _manifest_dataset(location, manifest)
    client.log_inputs(run_id, datasets=[DatasetInput(
        dataset._to_mlflow_entity(), tags=[InputTag("mlflow.data.context", context)])])
