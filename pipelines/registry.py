"""MLflow model registry: log, register, tag, alias, and the champion gate; model lookup.

A registered version is the PyTorch flavour of ``fcn_core.serving.SegmentationModel``
(pickle serialisation, fcn_core shipped as code), so ``mlflow.pyfunc.load_model`` works
anywhere torch and mlflow are installed: uint8 RGB (N, H, W, 3) in, class ids (N, H, W) out.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import fcn_core
from fcn_core.serving import SegmentationModel
from fcn_core.transforms import MEAN_BGR

CANDIDATE, CHAMPION = "candidate", "champion"


class ModelLookupError(ValueError):
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


def resolve_model(uri: str, tracking_uri: str | None = None) -> LoadedModel:
    """A ``models:/name@alias``, ``models:/name/version``, ``runs:/...`` URI or a local
    checkpoint (directory or checkpoint.pt) -> the net and its input conventions."""
    if is_mlflow_uri(uri):
        import mlflow
        import mlflow.pytorch
        from mlflow.exceptions import MlflowException

        if tracking_uri:
            mlflow.set_tracking_uri(tracking_uri)
        try:
            wrapper = mlflow.pytorch.load_model(uri, map_location="cpu")
        except MlflowException as e:
            raise ModelLookupError(f"cannot load {uri}: {e.message.splitlines()[0]}") from None
        mean = tuple(float(v) for v in wrapper.mean_bgr.tolist())
        return LoadedModel(wrapper.net.eval(), mean, wrapper.input, uri)  # type: ignore[arg-type]
    from pipelines.train import load_model, read_checkpoint

    try:
        state = read_checkpoint(uri)
    except FileNotFoundError as e:
        raise ModelLookupError(f"{e}: expected a models:/ or runs:/ URI or a checkpoint "
                               "directory") from None
    cfg = state.get("config", {})
    mean = MEAN_BGR[cfg.get("dataset", "voc")]
    return LoadedModel(load_model(uri).eval(), mean, cfg.get("input", "rgb"), str(uri))


def _signature() -> Any:
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Schema, TensorSpec

    return ModelSignature(inputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, -1, -1, 3))]),
                          outputs=Schema([TensorSpec(np.dtype(np.int64), (-1, -1, -1))]))


def pip_requirements() -> list[str]:
    import mlflow

    return [f"torch=={torch.__version__.split('+')[0]}", f"mlflow=={mlflow.__version__}",
            f"numpy=={np.__version__}"]


@dataclass(frozen=True)
class Registration:
    name: str
    version: str
    run_id: str
    champion: bool  # whether this version took the champion alias
    decision: str  # why, with both numbers


def register(checkpoint: str, *, name: str, metrics: dict[str, float], split: str,
             manifest: dict[str, Any], config_digest: str, run_id: str | None = None,
             evaluate_champion: Any = None, log: Any = print) -> Registration:
    """Log the checkpoint's net as an MLflow model, register it as a new version of
    ``name``, tag it, point ``candidate`` at it, and run the champion gate.

    ``evaluate_champion(uri) -> mean IU`` re-scores the current champion on ``split`` when
    its recorded score is for another split or dataset version.
    """
    import mlflow
    import mlflow.pytorch
    from mlflow.tracking import MlflowClient

    from pipelines.tracking import experiment_id, tracking_uri

    loaded = resolve_model(checkpoint)
    if loaded.input != "rgb":
        raise ValueError(f"only RGB models are registered for serving, this one takes "
                         f"input={loaded.input!r}")
    wrapper = SegmentationModel(loaded.net, loaded.mean_bgr, loaded.input).eval()
    client = MlflowClient(tracking_uri())
    mlflow.set_tracking_uri(tracking_uri())
    if run_id is None:
        exp = experiment_id(client, f"fcn-{manifest['dataset']}")
        run_id = client.create_run(exp, run_name=f"register-{name}").info.run_id
    example = np.zeros((1, 32, 32, 3), np.uint8)
    with mlflow.start_run(run_id=run_id):
        info = mlflow.pytorch.log_model(
            wrapper, name="model", serialization_format="pickle",
            code_paths=[str(Path(fcn_core.__file__).parent)], signature=_signature(),
            input_example=example, pip_requirements=pip_requirements(),
            registered_model_name=name)
    version = str(info.registered_model_version)
    arch = loaded.net.config.to_dict()
    tags = {"variant": arch["variant"], "stage": arch["variant"].removeprefix("fcn"),
            "width": str(arch["width"]), "dataset": manifest["dataset"],
            "dataset_fingerprint": manifest["source"]["fingerprint"],
            "dataset_version": manifest["version"], "config_digest": config_digest,
            "eval_split": split, "checkpoint": str(checkpoint)}
    # Full precision: the gate compares these numbers, and a rounded tag would make a
    # re-registered identical model lose the tie it should win.
    tags.update({k: repr(float(v)) for k, v in metrics.items() if isinstance(v, float)})
    for k, v in tags.items():
        client.set_model_version_tag(name, version, k, v)
    client.set_registered_model_alias(name, CANDIDATE, version)
    took, decision = gate_champion(client, name, version, metrics["mean_iu"], split,
                                   tags["dataset_fingerprint"], evaluate_champion)
    client.set_tag(run_id, "registered_model", f"{name}/{version}")
    client.set_tag(run_id, "champion_decision", decision)
    client.log_metric(run_id, "champion_gate_new_mean_iu", metrics["mean_iu"])
    log(f"registered {name} version {version} (alias {CANDIDATE}); {decision}")
    return Registration(name, version, run_id, took, decision)


def gate_champion(client: Any, name: str, version: str, mean_iu: float, split: str,
                  fingerprint: str, evaluate_champion: Any = None) -> tuple[bool, str]:
    """Move ``champion`` to ``version`` only if its mean IU is at least the champion's on
    the same split (ties go to the newer model). A worse model never takes the alias.
    Returns (whether it moved, the decision with both numbers)."""
    from mlflow.exceptions import MlflowException

    try:
        champ = client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        champ = None
    if champ is None:
        client.set_registered_model_alias(name, CHAMPION, version)
        decision = f"champion: version {version} (mean IU {mean_iu:.4f}; there was none)"
        _record(client, name, version, decision, None)
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
        client.set_registered_model_alias(name, CHAMPION, version)
        decision = (f"champion: version {version} (mean IU {mean_iu:.4f} >= "
                    f"{champ_iu:.4f} of version {champ.version})")
        took = True
    else:
        decision = (f"champion stays version {champ.version} (mean IU {champ_iu:.4f} > "
                    f"{mean_iu:.4f} of version {version})")
        took = False
    _record(client, name, version, decision, champ_iu)
    return took, decision


def _record(client: Any, name: str, version: str, decision: str, champ_iu: float | None
            ) -> None:
    client.set_model_version_tag(name, version, "champion_decision", decision)
    if champ_iu is not None:
        client.set_model_version_tag(name, version, "champion_mean_iu_at_gate",
                                     repr(float(champ_iu)))


def list_models(name: str | None = None) -> list[dict[str, Any]]:
    """Rows for ``fcn models``: one per version, newest first. Aliases are read from the
    registered model (search_model_versions returns them empty, MLflow issue 9783)."""
    from mlflow.tracking import MlflowClient

    from pipelines.tracking import tracking_uri

    client = MlflowClient(tracking_uri())
    names = [name] if name else [m.name for m in client.search_registered_models()]
    rows = []
    for n in names:
        from mlflow.exceptions import MlflowException

        try:
            aliases = client.get_registered_model(n).aliases
        except MlflowException:
            raise ModelLookupError(f"no registered model named {n!r}") from None
        by_version: dict[str, list[str]] = {}
        for alias, v in aliases.items():
            by_version.setdefault(str(v), []).append(alias)
        for mv in client.search_model_versions(f"name = '{n}'"):
            rows.append({
                "name": n, "version": mv.version,
                "aliases": ",".join(sorted(by_version.get(str(mv.version), []))),
                "stage": mv.tags.get("stage", "-"), "mean_iu": mv.tags.get("mean_iu", "-"),
                "split": mv.tags.get("eval_split", "-"),
                "created": time.strftime("%Y-%m-%d %H:%M",
                                         time.localtime(mv.creation_timestamp / 1000)),
            })
    rows.sort(key=lambda r: (r["name"], -int(r["version"])))
    return rows
