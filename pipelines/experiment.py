"""A grid of training configs compared in one table: the paper's experiments (Tables 1-2, §4.4).

An experiment file (``configs/paper/*.yaml``) names a base config and rows; each row is the
base with some keys set. ``flows.experiment`` runs every row through the pipeline (train,
then evaluate) and this module measures what the table compares and writes it: mean IU,
pixel acc, mean acc, f.w. IU, parameters, GMAC at 500x500, training and inference images/s,
as markdown, a JSON table and a bar chart. No Prefect here.
"""

from __future__ import annotations

import dataclasses
import math
import re
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from pipelines.config import ConfigError, TrainConfig, from_dict, preset_path

Log = Callable[[str], None]
_LABEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9 ._+()-]{0,63}")
GMAC_SIZE = 500  # the paper's forward-time size (Table 1: 500 x 500 inputs)
_KEYS = ("name", "title", "base", "dataset", "set", "split", "size", "note", "rows")
_ROW_KEYS = ("label", "set", "paper")
# The columns of the table: key, header, format; the scores in % as the paper prints them
COLUMNS = (("mean_iu", "mean IU %", "%"), ("pixel_acc", "pixel acc %", "%"),
           ("mean_acc", "mean acc %", "%"), ("fw_iu", "f.w. IU %", "%"),
           ("params_m", "params (M)", ".2f"), ("gmac", "GMAC@500", ".1f"),
           ("train_img_s", "train img/s", ".1f"), ("infer_img_s", "infer img/s", ".1f"))


def columns(size: int = GMAC_SIZE) -> tuple[tuple[str, str, str], ...]:
    """COLUMNS with the GMAC header naming the experiment's ``size``."""
    return tuple((k, f"GMAC@{size}" if k == "gmac" else h, f) for k, h, f in COLUMNS)


@dataclass(frozen=True)
class Row:
    label: str  # the table's row name, e.g. "FCN-32s-fixed"
    config: TrainConfig  # the base with the row's keys set
    paper: float | None = None  # the paper's mean IU (%) on the real dataset, if it reports one

    @property
    def slug(self) -> str:
        return re.sub(r"[^A-Za-z0-9._-]+", "-", self.label).strip("-").lower()


@dataclass(frozen=True)
class Experiment:
    name: str  # the MLflow parent run and the output folder
    title: str
    dataset: str  # what the rows train on (the base config's dataset)
    split: str  # the evaluation split
    rows: tuple[Row, ...]
    note: str = ""  # printed under the table (e.g. "synthetic data: ...")
    source: str = ""  # the file it was read from
    size: int = GMAC_SIZE  # GMAC are counted for one size x size image

    def only(self, labels: list[str]) -> Experiment:
        """The same experiment restricted to some rows (``--rows``)."""
        known = [r.label for r in self.rows]
        unknown = [x for x in labels if x not in known]
        if unknown:
            raise ConfigError(f"--rows: {unknown} are not rows of {self.name} (it has "
                              f"{', '.join(known)})")
        return dataclasses.replace(self, rows=tuple(r for r in self.rows if r.label in labels))


def load_experiment(path: str | Path) -> Experiment:
    """Read and check an experiment file: every row's config is built (and so validated)
    now, and every problem is one ConfigError line naming the row and the key."""
    p = Path(preset_path(path))
    where = f"experiment {path}"
    if not p.is_file():
        raise ConfigError(f"experiment file not found: {p}")
    try:
        spec = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{where}: not valid YAML: {getattr(e, 'problem', e)}") from None
    if not isinstance(spec, dict):
        raise ConfigError(f"{where}: must be a mapping with name, base and rows")
    unknown = sorted(set(spec) - set(_KEYS))
    if unknown:
        raise ConfigError(f"{where}: unknown keys {unknown} (known: {', '.join(_KEYS)})")
    for key in ("name", "base", "rows"):
        if key not in spec:
            raise ConfigError(f"{where}: missing {key}")
    name = str(spec["name"])
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", name):
        raise ConfigError(f"{where}: name must be letters, digits, '.', '_' or '-', got "
                          f"{name!r}")
    base_path = (p.parent / str(spec["base"])).resolve()
    if not base_path.is_file():
        raise ConfigError(f"{where}: base config not found: {base_path}")
    base = yaml.safe_load(base_path.read_text()) or {}
    common = spec.get("set") or {}
    if not isinstance(common, dict):
        raise ConfigError(f"{where}: set must be a mapping of config keys")
    rows_spec = spec["rows"]
    if not isinstance(rows_spec, list) or not rows_spec:
        raise ConfigError(f"{where}: rows must be a non-empty list of {{label, set}}")
    rows: list[Row] = []
    for i, r in enumerate(rows_spec):
        rows.append(_row(r, i, name, {**base, **common}, where))
    labels = [r.label for r in rows]
    dup = sorted({x for x in labels if labels.count(x) > 1})
    if dup:
        raise ConfigError(f"{where}: row labels must differ, got {dup} more than once")
    datasets = {r.config.dataset for r in rows}
    if len(datasets) > 1:
        raise ConfigError(f"{where}: every row must train on one dataset, got "
                          f"{sorted(datasets)}")
    dataset = datasets.pop()
    if spec.get("dataset") not in (None, dataset):
        raise ConfigError(f"{where}: dataset {spec['dataset']!r} but the rows' configs are "
                          f"for {dataset!r}")
    size = spec.get("size", GMAC_SIZE)
    if isinstance(size, bool) or not isinstance(size, int) or not 1 <= size <= 4096:
        raise ConfigError(f"{where}: size (the GMAC input, pixels) must be an int in "
                          f"[1, 4096], got {size!r}")
    return Experiment(name=name, title=str(spec.get("title") or name), dataset=dataset,
                      split=str(spec.get("split") or rows[0].config.val_split),
                      rows=tuple(rows), note=str(spec.get("note") or "").strip(),
                      source=str(p), size=size)


def _row(r: Any, i: int, name: str, base: Mapping[str, Any], where: str) -> Row:
    at = f"{where}: rows[{i}]"
    if not isinstance(r, dict) or "label" not in r:
        raise ConfigError(f"{at}: must be a mapping with a label (and set: config keys)")
    unknown = sorted(set(r) - set(_ROW_KEYS))
    if unknown:
        raise ConfigError(f"{at}: unknown keys {unknown} (known: {', '.join(_ROW_KEYS)})")
    label = str(r["label"])
    if not _LABEL.fullmatch(label):
        raise ConfigError(f"{at}: label must be 1-64 letters, digits, spaces or ._+()-, got "
                          f"{label!r}")
    keys = r.get("set") or {}
    if not isinstance(keys, dict):
        raise ConfigError(f"{at} ({label}): set must be a mapping of config keys")
    paper = r.get("paper")
    if paper is not None and not isinstance(paper, (int, float)):
        raise ConfigError(f"{at} ({label}): paper must be the paper's mean IU (a number), got "
                          f"{paper!r}")
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", label).strip("-").lower()
    try:
        cfg = from_dict({**base, **keys, "name": f"{name}-{slug}"})
    except ConfigError as e:
        raise ConfigError(f"{at} ({label}): {e}") from None
    return Row(label, cfg, None if paper is None else float(paper))


# ------------------------------------------------------------------- measuring a row


def train_speed(stages: list[Mapping[str, Any]]) -> float:
    """Training images/s over a row's stages (each stage's loop, validations left out): all
    their steps over all their time (a row's stages share batch size and workers); NaN when
    no stage recorded it."""
    steps = weighted = 0.0  # images/s = sum(n) / sum(n / rate): the images per step cancel
    for s in stages:
        rate = s.get("metrics", {}).get("train_img_per_s")
        if rate and rate > 0 and s.get("steps"):
            n = float(s["steps"])
            steps, weighted = steps + n, weighted + n / float(rate)
    return steps / weighted if weighted else math.nan


def measure_net(checkpoint: str, size: int = GMAC_SIZE, log: Log = print
                ) -> dict[str, float]:
    """Parameters (the learned ones, as the paper counts them) and GMAC of one forward at
    size x size. Inference speed is ``inference_speeds``'s, for all rows together."""
    import torch

    from fcn_core.profile import learned_params, total_macs
    from pipelines.registry import resolve_model

    net = resolve_model(checkpoint).net.eval()
    params = learned_params(net)  # the paper's count: not the fixed upsampling
    c = int(getattr(getattr(net, "config", None), "in_channels", 3))
    macs = total_macs(net, torch.zeros(1, c, size, size))
    log(f"{params / 1e6:.2f} M parameters, {macs / 1e9:.2f} GMAC at {size}x{size}")
    return {"params_m": params / 1e6, "gmac": macs / 1e9}


def interleaved_seconds(runs: Mapping[str, Callable[[], object]], repeats: int,
                        clock: Callable[[], float] = time.perf_counter) -> dict[str, float]:
    """The median seconds of each callable over ``repeats`` rounds. Every round runs each
    once, round r starting at the r-th (mod their count): a slow spell of the machine (a
    training's processes still exiting, say) falls on all of them alike, not on one."""
    names = list(runs)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        k = r % len(names) if names else 0
        for n in names[k:] + names[:k]:
            t0 = clock()
            runs[n]()
            times[n].append(clock() - t0)
    return {n: statistics.median(v) for n, v in times.items()}


def inference_speeds(checkpoints: Mapping[str, str], data: str, split: str, *,
                     images: int = 8, repeats: int = 5, log: Log = print) -> dict[str, float]:
    """Inference images/s of each row's net (label -> checkpoint): up to ``images`` rows of
    ``split`` predicted one at a time as evaluation does (decode, forward, argmax), after one
    warm-up each; the nets measured together, interleaved (``interleaved_seconds``), once
    every row has trained. Measured per row right after its training, the same net read
    24.9 and 32.6 images/s in one table (2026-12-07)."""
    import torch

    from fcn_core.inference import InferenceOptions
    from pipelines.evaluate import predict_row
    from pipelines.registry import resolve_model
    from pipelines.shards import read_split_table

    rows = read_split_table(data, split).slice(0, images).to_pylist()
    if not rows or not checkpoints:
        return {label: math.nan for label in checkpoints}
    device, options = torch.device("cpu"), InferenceOptions()
    loaded = {label: resolve_model(ckpt) for label, ckpt in checkpoints.items()}
    for m in loaded.values():
        m.net.eval()

    def pass_over(m: Any) -> Callable[[], None]:
        def run() -> None:
            for row in rows:
                predict_row(m, row, options, device)
        return run

    with torch.inference_mode():
        for m in loaded.values():
            predict_row(m, rows[0], options, device)  # warm-up: first-call allocations
        seconds = interleaved_seconds({k: pass_over(m) for k, m in loaded.items()}, repeats)
    speeds = {k: len(rows) / s for k, s in seconds.items()}
    log(f"inference images/s ({len(rows)} {split} images per net, one at a time; median of "
        f"{repeats} rounds, the nets interleaved): "
        + ", ".join(f"{k} {v:.1f}" for k, v in speeds.items()))
    return speeds


# ------------------------------------------------------------------- the table


def markdown(exp: Experiment, results: list[dict[str, Any]]) -> str:
    """The comparison table: one line per row (in the file's order), a failed row says so."""
    paper = any(r.paper is not None for r in exp.rows)
    head = ["row", *(h for _, h, _ in columns(exp.size)),
            *(["paper mean IU %"] if paper else [])]
    lines = [f"### {exp.title}", "", "| " + " | ".join(head) + " |",
             "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    by_label = {r["label"]: r for r in results}
    for row in exp.rows:
        res = by_label.get(row.label)
        if res is None or res.get("error"):
            why = res["error"] if res else "not run"
            cells = [f"failed: {why}".replace("|", "/")] + [""] * (len(COLUMNS) - 1)
        else:
            cells = [_fmt(res.get(k), f) for k, _, f in COLUMNS]
        if paper:
            cells.append("" if row.paper is None else f"{row.paper:.1f}")
        lines.append("| " + " | ".join([row.label, *cells]) + " |")
    lines += ["", f"{exp.dataset} [{exp.split}]. {exp.note}".strip()]
    return "\n".join(lines) + "\n"


def _fmt(v: Any, f: str) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{100 * v:.1f}" if f == "%" else format(v, f)


def table_columns(results: list[dict[str, Any]]) -> dict[str, list[Any]]:
    """The rows as columns (``mlflow.log_table``'s dict form)."""
    done = [r for r in results if not r.get("error")]
    cols: dict[str, list[Any]] = {"row": [r["label"] for r in done]}
    for k, _, _ in COLUMNS:
        cols[k] = [float(r.get(k, math.nan)) for r in done]
    return cols


def bar_chart(exp: Experiment, results: list[dict[str, Any]], path: str | Path) -> Path:
    """Mean IU per row as a PNG bar chart (the paper's numbers beside, when it has them)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = {r["label"]: r for r in results if not r.get("error")}
    rows = [r for r in exp.rows if r.label in done]
    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * max(len(rows), 1), 3.6), dpi=100)
    xs = range(len(rows))
    ours = [100 * done[r.label]["mean_iu"] for r in rows]
    paper = [r.paper if r.paper is not None else 0.0 for r in rows]
    with_paper = any(r.paper is not None for r in rows)
    w = 0.4 if with_paper else 0.6
    ax.bar([x - (w / 2 if with_paper else 0) for x in xs], ours, w,
           label=f"this run ({exp.dataset})")
    if with_paper:
        ax.bar([x + w / 2 for x in xs], paper, w, label="paper (real data)")
    ax.set_xticks(list(xs), [r.label for r in rows], rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("mean IU (%)")
    ax.set_ylim(0, 100)
    ax.set_title(exp.title, fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out)
    plt.close(fig)
    return out


def log_table(exp: Experiment, results: list[dict[str, Any]], folder: str | Path,
              parent_run: str | None, log: Log = print) -> dict[str, str]:
    """Write table.md and chart.png to ``folder`` and, with an MLflow parent run, log them
    with the JSON table (``mlflow.log_table``) to it. Returns what was written where."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    md = folder / "table.md"
    md.write_text(markdown(exp, results))
    out = {"markdown": str(md)}
    if any(not r.get("error") for r in results):
        out["chart"] = str(bar_chart(exp, results, folder / "chart.png"))
    if parent_run:
        from mlflow.tracking import MlflowClient

        from pipelines.tracking import tracking_uri

        client = MlflowClient(tracking_uri())
        for f in (md, folder / "chart.png"):
            if f.is_file():
                client.log_artifact(parent_run, str(f))
        import warnings

        with warnings.catch_warnings():  # pandas 3 about MLflow's own select_dtypes call
            warnings.filterwarnings("ignore", message="For backward compatibility, 'str' dtypes")
            client.log_table(parent_run, data=table_columns(results),
                             artifact_file="table.json")
        out["mlflow"] = f"runs:/{parent_run}/table.json"
    log(f"table: {md}" + (f"; chart: {out['chart']}" if "chart" in out else ""))
    return out
