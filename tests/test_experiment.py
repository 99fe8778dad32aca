"""Experiment files (the paper's tables): checked at load, rows built from the base, the
table's numbers and format, and the stage identity that lets rows share their stages.
The runner itself runs end to end in tests/test_flows.py."""

import math
from pathlib import Path

import pytest

from flows.tasks import _stage_key, stage_identity
from pipelines.config import ConfigError
from pipelines.experiment import (
    COLUMNS,
    bar_chart,
    load_experiment,
    markdown,
    table_columns,
    train_speed,
)

ROOT = Path(__file__).resolve().parents[1]
PRESETS = sorted((ROOT / "configs" / "paper").glob("*.yaml"))


def write(tmp_path: Path, text: str) -> Path:
    (tmp_path / "base.yaml").write_text(
        "name: b\ndataset: synthetic\nwidth: 0.0625\nworkers: 1\n"
        "stages: [{name: 32s, steps: 2, lr: 0.001}]\n")
    p = tmp_path / "exp.yaml"
    p.write_text(text)
    return p


def test_the_presets_load_with_the_paper_rows():
    assert [p.stem for p in PRESETS] == ["sec4.4", "table1", "table2"]
    t1 = load_experiment(ROOT / "configs/paper/table1.yaml")
    assert [(r.config.backbone, r.paper) for r in t1.rows] == [
        ("alexnet", 39.8), ("vgg16", 56.0), ("googlenet", 42.5)]
    t2 = load_experiment(ROOT / "configs/paper/table2.yaml")
    assert [[s.name for s in r.config.stages] for r in t2.rows] == [
        ["32s"], ["32s"], ["32s", "16s"], ["32s", "16s", "8s"], ["8s-atonce"]]
    assert t2.rows[0].config.stages[0].train == "score_only"
    s44 = load_experiment(ROOT / "configs/paper/sec4.4.yaml")
    got = [(r.config.loss_sampling, r.config.class_weights, r.config.jitter) for r in s44.rows]
    assert got == [(1.0, "none", 0), (0.5, "none", 0), (1.0, "median_frequency", 0),
                   (1.0, "none", 32)]
    # Every row is its own run name, derived from the experiment and the label.
    assert [r.config.name for r in t2.rows][:2] == ["table2-fcn-32s-fixed", "table2-fcn-32s"]


def test_the_zoo_comparison_trains_every_successor_and_quotes_torchvisions_numbers():
    """configs/zoo/compare.yaml: FCN-8s and every net of fcn_core/zoo (a test keeps the file
    in step with the table), GMAC at 512 x 512; its paper column for torchvision's nets is
    their weights' published mean IU, read here from torchvision's own metadata."""
    import torchvision.models.segmentation as seg

    from fcn_core.models import _TABLE, SUCCESSORS, TORCHVISION

    exp = load_experiment(ROOT / "configs/zoo/compare.yaml")
    models = [r.config.model for r in exp.rows]
    assert models[0] is None and [s.name for s in exp.rows[0].config.stages] == ["8s-atonce"]
    assert sorted(models[1:]) == sorted(SUCCESSORS)
    assert exp.size == 512 and "| GMAC@512 |" in markdown(exp, [])
    assert {(r.config.stages[-1].steps, r.config.crop_size) for r in exp.rows} == {(150, 64)}
    weights = {"fcn_resnet50": seg.FCN_ResNet50_Weights,
               "fcn_resnet101": seg.FCN_ResNet101_Weights,
               "deeplabv3_resnet50": seg.DeepLabV3_ResNet50_Weights,
               "deeplabv3_resnet101": seg.DeepLabV3_ResNet101_Weights,
               "deeplabv3_mobilenet_v3_large": seg.DeepLabV3_MobileNet_V3_Large_Weights,
               "lraspp_mobilenet_v3_large": seg.LRASPP_MobileNet_V3_Large_Weights}
    assert set(weights) == {n for n, (m, _, _) in _TABLE.items() if m == TORCHVISION}
    for row in exp.rows:
        if row.config.model in weights:
            meta = weights[row.config.model].DEFAULT.meta["_metrics"]
            assert row.paper == meta["COCO-val2017-VOC-labels"]["miou"], row.label


def test_an_experiment_size_is_checked(tmp_path):
    with pytest.raises(ConfigError, match=r"size \(the GMAC input, pixels\) must be an int"):
        load_experiment(write(tmp_path, "name: e\nbase: base.yaml\nsize: 0\n"
                                        "rows: [{label: a}]\n"))


def test_rows_are_the_base_with_the_common_and_their_own_keys(tmp_path):
    exp = load_experiment(write(tmp_path, (
        "name: e\nbase: base.yaml\nset: {batch_size: 3}\n"
        "rows:\n  - {label: a}\n  - {label: b, set: {batch_size: 5, backbone: alexnet}}\n")))
    a, b = exp.rows
    assert (a.config.width, a.config.batch_size, a.config.backbone) == (0.0625, 3, "vgg16")
    assert (b.config.batch_size, b.config.backbone) == (5, "alexnet")
    assert exp.split == "val" and exp.dataset == "synthetic"
    assert [r.label for r in exp.only(["b"]).rows] == ["b"]
    with pytest.raises(ConfigError, match=r"--rows: \['c'\] are not rows of e"):
        exp.only(["c"])


@pytest.mark.parametrize("text, message", [
    ("name: e\nbase: base.yaml\nrows: []\n", "rows must be a non-empty list"),
    ("name: e\nrows: [{label: a}]\n", "missing base"),
    ("name: e\nbase: gone.yaml\nrows: [{label: a}]\n", "base config not found"),
    ("name: e\nbase: base.yaml\nrow: [{label: a}]\n", "unknown keys ['row']"),
    ("name: e f\nbase: base.yaml\nrows: [{label: a}]\n", "name must be letters"),
    ("name: e\nbase: base.yaml\nrows: [{label: a}, {label: a}]\n", "row labels must differ"),
    ("name: e\nbase: base.yaml\nrows: [{set: {}}]\n", "rows[0]: must be a mapping with a label"),
    ("name: e\nbase: base.yaml\nrows: [{label: a, paper: high}]\n", "paper must be"),
    ("name: e\nbase: base.yaml\nrows: [{label: a, set: {widht: 1}}]\n",
     "rows[0] (a): unknown key 'widht' (did you mean 'width'?)"),
    ("name: e\nbase: base.yaml\nrows: [{label: a, set: {backbone: alexnet, stages: "
     "[{name: 32s, steps: 1, lr: 1}, {name: 16s, steps: 1, lr: 1}]}}]\n",
     "rows[0] (a): backbone: 'alexnet' nets are FCN-32s only"),
    ("name: e\nbase: base.yaml\nrows: [{label: a}, {label: b, set: {dataset: nyud}}]\n",
     "every row must train on one dataset"),
])
def test_a_bad_experiment_file_is_one_line_naming_the_row_and_key(tmp_path, text, message):
    with pytest.raises(ConfigError) as e:
        load_experiment(write(tmp_path, text))
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_the_table_prints_percent_and_marks_failed_rows(tmp_path):
    exp = load_experiment(write(tmp_path, (
        "name: e\ntitle: T\nbase: base.yaml\nnote: synthetic, say so\n"
        "rows:\n  - {label: a, paper: 59.4}\n  - {label: b}\n  - {label: c}\n")))
    ok = {"label": "a", "mean_iu": 0.5, "pixel_acc": 0.875, "mean_acc": 0.6, "fw_iu": 0.8,
          "params_m": 3.9, "gmac": 3.38, "train_img_s": 20.0, "infer_img_s": math.nan}
    md = markdown(exp, [ok, {"label": "b", "error": "stage 32s | failed"}])
    lines = md.splitlines()
    assert lines[0] == "### T"
    assert lines[2].startswith("| row | mean IU % | pixel acc % |")
    assert lines[2].endswith("| paper mean IU % |")
    assert lines[4] == "| a | 50.0 | 87.5 | 60.0 | 80.0 | 3.90 | 3.4 | 20.0 | - | 59.4 |"
    assert lines[5].startswith("| b | failed: stage 32s / failed |")  # no stray column
    assert lines[5].count("|") == lines[4].count("|")
    assert lines[6].startswith("| c | failed: not run |")
    assert md.rstrip().endswith("synthetic [val]. synthetic, say so")
    cols = table_columns([ok, {"label": "b", "error": "x"}])
    assert cols["row"] == ["a"] and set(cols) == {"row", *(k for k, _, _ in COLUMNS)}
    png = bar_chart(exp, [ok], tmp_path / "chart.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_training_speed_is_all_images_over_all_time():
    # 100 steps at 10 img/s (10 s per image-step unit) and 100 at 30 img/s: 200 n / (10 + 3.33)
    stages = [{"steps": 100, "metrics": {"train_img_per_s": 10.0}},
              {"steps": 100, "metrics": {"train_img_per_s": 30.0}}]
    assert train_speed(stages) == pytest.approx(15.0)
    assert math.isnan(train_speed([{"steps": 3, "metrics": {}}]))


def _cfg(stages, name="n", **kw):
    return {"name": name, "width": 0.5, **kw,
            "stages": [{"name": s, "steps": n, "lr": 1e-3} for s, n in stages]}


def test_a_stage_is_identified_by_what_decides_its_weights():
    """Rows that differ only in later stages, or in name, share their earlier stages; any
    change up to the stage (its steps, a config key) is another stage."""
    def key(cfg, stage, init=None):
        return _stage_key(None, {"fingerprint": "f", "config": cfg, "stage": stage,
                                 "init_checkpoint": init})

    s32 = _cfg([("32s", 200)])
    s16 = _cfg([("32s", 200), ("16s", 100)], name="other")
    assert key(s32, "32s") == key(s16, "32s")
    assert stage_identity(s16, "32s")["stages"] == s32["stages"]
    assert key(s16, "32s") != key(_cfg([("32s", 201), ("16s", 100)]), "32s")
    assert key(s32, "32s") != key(_cfg([("32s", 200)], width=0.25), "32s")
    assert key(s16, "16s") != key(_cfg([("32s", 200), ("16s", 99)]), "16s")
    assert key(s16, "16s", "a") != key(s16, "16s", "b")


def test_interleaved_seconds_rotates_the_order_and_takes_each_ones_median():
    """The table's inference speeds: the nets are timed in rounds, each round starting one
    further along, so a slow spell falls on every net alike; each net's median is kept."""
    from pipelines.experiment import interleaved_seconds

    order: list[str] = []
    now = [0.0]
    cost = {"a": 1.0, "b": 2.0, "c": 3.0}

    def runner(name: str):
        def run() -> None:
            order.append(name)
            now[0] += cost[name] + (10.0 if len(order) == 1 else 0.0)  # a slow first call
        return run

    secs = interleaved_seconds({n: runner(n) for n in "abc"}, 3, clock=lambda: now[0])
    assert order == list("abcbcacab")
    assert secs == {"a": 1.0, "b": 2.0, "c": 3.0}
    assert interleaved_seconds({}, 3) == {}
