"""The paper's protocols from datasets as downloaded (synthetic copies of each layout): ingest
with the reference split lists, a tiny training on the protocol's train split and an
evaluation under the protocol's rules, on a local Ray (Ray Data ingest and evaluation; the
training steps run in-process, the Ray Train path is test_train's)."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from fcn_core.fcn import fcn32s
from fcn_core.metrics import ConfusionMatrix
from pipelines.config import StageConfig, TrainConfig
from pipelines.errors import UserError
from pipelines.evaluate import evaluate
from pipelines.ingest import IngestConfig, ingest
from pipelines.shards import decode_arrays, read_manifest, read_split_table
from pipelines.sources import reference
from pipelines.sources import synthetic as synth
from pipelines.train.checkpoint import write_checkpoint
from pipelines.train.sampling import RowSampler
from pipelines.train.step import build_stage_model, make_optimizer, train_step

pytestmark = pytest.mark.usefixtures("ray_local")
QUIET = {"log": lambda m: None}


def _split_ids(data, split):
    return sorted(read_split_table(data, split, ["id"])["id"].to_pylist())


def tiny_fit(data, cfg: TrainConfig, steps: int = 6) -> str:
    """A few in-process SGD steps on the config's train split; the checkpoint's location."""
    from fcn_core.transforms import MEAN_BGR
    from pipelines.shards import model_input, training_batch

    n = read_manifest(data).num_classes
    stage = cfg.stages[0]
    torch.manual_seed(0)
    model = build_stage_model(cfg, stage, n, None, log=lambda m: None)
    opt = make_optimizer(model, cfg, stage)
    table = read_split_table(data, cfg.train_split)
    cols = {c: table[c].to_pylist() for c in ("id", "image", "label", "label_geo", "depth",
                                              "hha")}
    rows = RowSampler(cols, cfg.sampling, cfg.seed, cfg.batch_size)
    heads = list(cfg.heads or {"out": n})
    losses = []
    for step in range(steps):
        x, labels = model_input(training_batch(rows.batch(step)), MEAN_BGR[cfg.dataset],
                                "cpu", cfg.input)
        losses.append(train_step(model, opt, x, labels, heads, cfg.normalize_loss))
    assert all(np.isfinite(losses))
    return write_checkpoint(data.parent / f"{cfg.name}.pt", model, config=cfg.to_dict())


def _cfg(name, dataset, train, val, **kw):
    base = dict(width=1 / 16, workers=1, optimizer="adam", normalize_loss=True,
                sampling="random", stages=(StageConfig("32s", 6, 1e-3),))
    return TrainConfig(name=name, dataset=dataset, train_split=train, val_split=val,
                       **{**base, **kw})


# ------------------------------------------------------------------------ VOC + SBD

@pytest.fixture(scope="module")
def pascal_trees(tmp_path_factory):
    return synth.write_pascal(tmp_path_factory.mktemp("pascal"), n_train=8, n_val=4,
                              size=(32, 32))


def test_seg11valid_refuses_missing_ids_with_their_count(pascal_trees, tmp_path):
    cfg = IngestConfig(dataset="pascal", root=pascal_trees.voc, sbd_root=pascal_trees.sbd,
                       out=tmp_path)
    with pytest.raises(UserError, match=r"^732 of 736 seg11valid ids are missing from the "
                                        r"VOC tree .*2007_000129.*--allow-missing"):
        ingest(cfg, **QUIET)
    assert not (tmp_path / "pascal").exists()


def test_seg11valid_protocol(pascal_trees, tmp_path):
    t = pascal_trees
    r = ingest(IngestConfig(dataset="pascal", root=t.voc, sbd_root=t.sbd, out=tmp_path,
                            allow_missing=True), **QUIET)
    data = tmp_path / "pascal"
    assert r.rows == {"train": 8, "seg11valid": 4}
    assert _split_ids(data, "train") == sorted(t.sbd_train)  # SBD train, all of it
    assert _split_ids(data, "seg11valid") == sorted(t.seg11valid)
    assert t.leak not in _split_ids(data, "seg11valid")  # in VOC val, not in the list
    m = read_manifest(data).data
    assert m["source"]["protocol"] == "seg11valid" and m["source"]["missing"] == 732
    assert m["splits"]["seg11valid"]["rejected"] == 732
    # SBD labels have no void; the VOC seg11valid labels keep their 255 borders
    assert m["splits"]["train"]["ignore_pixels"] == 0
    assert m["splits"]["seg11valid"]["ignore_pixels"] > 0
    for row in read_split_table(data, "train").to_pylist():
        got = decode_arrays(row)["label"]
        assert got.shape == (32, 32) and 255 not in got and got.max() > 0
    # a tiny training on train and an evaluation on seg11valid (21 VOC classes)
    ckpt = tiny_fit(data, _cfg("voc-ref", "pascal", "train", "seg11valid"))
    res = evaluate(ckpt, data, "seg11valid", actors=1, log_to_mlflow=False, **QUIET)
    assert res.images == 4 and len(res.per_class) == 21
    assert 0.0 <= res.metrics["mean_iu"] <= 1.0


def test_seg11valid_refuses_leakage_and_allow_missing_drops_it(pascal_trees, tmp_path):
    t = pascal_trees
    listed = tmp_path / "my-seg11valid.txt"
    listed.write_text("".join(f"{i}\n" for i in (*t.seg11valid, t.leak)))
    cfg = dict(dataset="pascal", root=t.voc, sbd_root=t.sbd, out=tmp_path / "out",
               split_file=str(listed))
    with pytest.raises(UserError, match=rf"^1 seg11valid ids are also in SBD train, which "
                                        rf"would leak test images into training \({t.leak}\)"):
        ingest(IngestConfig(**cfg), **QUIET)
    r = ingest(IngestConfig(**cfg, allow_missing=True), **QUIET)
    assert r.rows == {"train": 8, "seg11valid": 4}
    m = read_manifest(tmp_path / "out" / "pascal").data
    assert (m["source"]["overlap"], m["source"]["missing"]) == (1, 0)


def test_trainaug_protocol(pascal_trees, tmp_path):
    t = pascal_trees
    r = ingest(IngestConfig(dataset="pascal", root=t.voc, sbd_root=t.sbd, out=tmp_path,
                            protocol="trainaug"), **QUIET)
    data = tmp_path / "pascal-trainaug"  # a second protocol does not replace the first
    expect = sorted((set(t.voc_train) | set(t.sbd_train) | set(t.sbd_val)) - set(t.voc_val))
    assert r.rows == {"train_aug": len(expect), "val": len(t.voc_val)}
    assert _split_ids(data, "train_aug") == expect
    assert _split_ids(data, "val") == sorted(t.voc_val)
    m = read_manifest(data).data
    # VOC's labels (with 255 borders) where VOC has them, SBD's (no void) for the others
    assert m["source"]["train_aug_from_voc"] == len(set(t.voc_train) & set(expect))
    rows = {r["id"]: decode_arrays(r)["label"] for r in
            read_split_table(data, "train_aug").to_pylist()}
    assert all((255 in rows[i]) == (i in t.voc_train) for i in expect)
    with pytest.raises(UserError, match="makes its splits from --protocol"):
        ingest(IngestConfig(dataset="pascal", root=t.voc, sbd_root=t.sbd, out=tmp_path,
                            splits=("train",)), **QUIET)
    with pytest.raises(UserError, match="pascal needs --sbd-root as well as --voc-root"):
        ingest(IngestConfig(dataset="pascal", root=t.voc, out=tmp_path), **QUIET)
    with pytest.raises(UserError, match=r"--protocol for pascal is one of seg11valid, "
                                        r"trainaug, got 'modern'"):
        ingest(IngestConfig(dataset="pascal", root=t.voc, sbd_root=t.sbd, out=tmp_path,
                            protocol="modern"), **QUIET)


# ---------------------------------------------------------------------------- NYUD

def test_nyud_trainval_test_protocol(tmp_path):
    raw = synth.write_nyud(tmp_path / "raw", n_train=3, n_val=2, n_test=2, size=(32, 32))
    r = ingest(IngestConfig(dataset="nyud", root=raw, out=tmp_path), **QUIET)
    data = tmp_path / "nyud"
    assert r.rows == {"train": 3, "val": 2, "test": 2, "trainval": 5}
    assert "total 7" in r.summary()  # trainval is listed over the same shards, not copied
    m = read_manifest(data).data
    assert m["splits"]["trainval"]["parts"] == ["train", "val"]
    assert {s["path"] for s in m["splits"]["trainval"]["shards"]} == \
        {s["path"] for p in ("train", "val") for s in m["splits"][p]["shards"]}
    assert _split_ids(data, "trainval") == sorted(_split_ids(data, "train") +
                                                  _split_ids(data, "val"))
    # asked for by name, trainval is read as train + val
    r2 = ingest(IngestConfig(dataset="nyud", root=raw, out=tmp_path / "b",
                             splits=("trainval", "test")), **QUIET)
    assert r2.rows == {"train": 3, "val": 2, "test": 2, "trainval": 5}
    # a tiny training on trainval, evaluated on test (40 classes)
    ckpt = tiny_fit(data, _cfg("nyud-rgb", "nyud", "trainval", "test"))
    res = evaluate(ckpt, data, "test", actors=1, log_to_mlflow=False, **QUIET)
    assert res.images == 2 and len(res.per_class) == 40


# ------------------------------------------------------------------------- SIFT Flow

def test_excluded_classes_leave_the_means_but_count_as_errors():
    cm = ConfusionMatrix(4)
    cm.update(np.array([0, 0, 1, 1, 2, 2]), np.array([0, 3, 1, 1, 2, 0]))
    full, ex = cm.scores(), cm.scores(exclude=[3])
    assert full["per_class_iu"][3] == 0.0  # predicted, never true: IU 0 drags the mean
    assert ex["mean_iu"] == pytest.approx(np.mean(full["per_class_iu"][:3]))
    assert ex["mean_iu"] > full["mean_iu"]
    assert ex["pixel_acc"] == full["pixel_acc"] == pytest.approx(4 / 6)


def test_siftflow_scores_both_heads_under_the_reference_protocol(tmp_path):
    raw = synth.write_siftflow(tmp_path / "raw", n_train=4, n_val=3, size=(32, 32))
    # an unannotated image the reference leaves out of evaluation, in the test list
    cat = raw / "Images" / synth.SIFTFLOW_DIR
    ex = synth.example("siftflow", 99, (32, 32))
    Image.fromarray(ex["image"]).save(cat / "highway_bost181.jpg")
    import scipy.io
    for d, key in (("SemanticLabels", "label"), ("GeoLabels", "label_geo")):
        scipy.io.savemat(raw / d / synth.SIFTFLOW_DIR / "highway_bost181.mat",
                         {"S": np.zeros_like(ex[key], np.float64)})
    with open(raw / "test.txt", "a") as f:
        f.write("highway_bost181\n")
    ingest(IngestConfig(dataset="siftflow", root=raw, out=tmp_path), **QUIET)
    data = tmp_path / "siftflow"
    assert len(_split_ids(data, "test")) == 4
    cfg = _cfg("sf", "siftflow", "trainval", "test", heads={"semantic": 33, "geometric": 3})
    ckpt = tiny_fit(data, cfg)
    res = evaluate(ckpt, data, "test", actors=1, log_to_mlflow=False, **QUIET)
    assert res.images == 3 and res.skipped == ("highway_bost181",)
    assert list(res.heads) == ["semantic", "geometric"]
    sem, geo = res.heads["semantic"], res.heads["geometric"]
    assert sem.excluded == ("cow", "desert", "moon")
    assert len(sem.per_class) == 33 and [n for n, _ in geo.per_class] == \
        ["sky", "horizontal", "vertical"]
    kept = [v for n, v in sem.per_class if n not in sem.excluded]
    assert sem.metrics["mean_iu"] == pytest.approx(np.nanmean(kept))
    assert res.metrics == sem.metrics
    assert {"geometric_pixel_acc", "geometric_mean_iu"} <= set(res.flat_metrics())
    table = res.table()
    assert "[semantic]" in table and "[geometric]" in table and "excluded" in table
    s = res.summary()
    assert s["skipped_ids"] == ["highway_bost181"]
    assert json.dumps(s)  # JSON-ready for --result-json
    assert set(s["heads"]) == {"semantic", "geometric"}


def test_shipped_reference_lists_have_the_documented_sizes():
    sizes = {("pascal", "seg11valid"): 736, ("nyud", "train"): 381, ("nyud", "val"): 414,
             ("nyud", "test"): 654, ("siftflow", "test"): 200, ("siftflow", "trainval"): 2486}
    for (p, n), size in sizes.items():
        assert len(reference.ids(p, n)) == len(set(reference.ids(p, n))) == size, (p, n)
    assert not set(reference.ids("siftflow", "trainval")) & {"highway_bost181",
                                                            "street_urb506"}
    assert len(reference.numbered_classes("pascal-context", "classes-59")) == 60


def test_a_single_head_net_is_scored_on_the_semantic_labels(tmp_path):
    raw = synth.write_siftflow(tmp_path / "raw", n_train=2, n_val=1, size=(32, 32))
    ingest(IngestConfig(dataset="siftflow", root=raw, out=tmp_path), **QUIET)
    net = fcn32s(num_classes=33, width=1 / 16)  # one head: scored on the semantic labels only
    ckpt = write_checkpoint(tmp_path / "one.pt", net, config=_cfg(
        "sf1", "siftflow", "trainval", "test").to_dict())
    res = evaluate(ckpt, tmp_path / "siftflow", "test", actors=1, log_to_mlflow=False,
                   **QUIET)
    assert list(res.heads) == ["out"] and res.heads["out"].excluded == ("cow", "desert",
                                                                       "moon")


# ------------------------------------------------------------------- PASCAL-Context 59

def test_context_labels_follow_the_reference_mapping(tmp_path):
    from pipelines.sources import context
    from pipelines.sources.common import load_example

    voc, ctx = synth.write_context(tmp_path, n_train=3, n_val=2, size=(32, 32))
    records, problems = context.list_records(voc, ctx)
    assert problems == [] and [(r.split, r.id) for r in records][:1] == [("train",
                                                                         "2010_000000")]
    assert {r.split for r in records} == {"train", "val"}  # not the per-class lists
    for i, rec in enumerate(records):
        arrays, why = load_example(rec, context.NUM_CLASSES)
        s = synth.scene(0, i, (32, 32))
        want = synth.CONTEXT_IDS[s.cls]
        want[s.ring] = 0  # a class outside the 59 is background, not void
        assert why is None and np.array_equal(arrays["label"], want)
    assert context.CLASSES[11] == "diningtable" and context.CLASSES[52] == "bedcloth"
    # a bad LabelMap is one quarantine reason; a missing annotation one problem row
    import scipy.io
    scipy.io.savemat(ctx / "trainval" / "2010_000000.mat",
                     {"LabelMap": np.full((32, 32), 9999, np.uint16)})
    _, why = load_example(records[0], context.NUM_CLASSES)
    assert "LabelMap values outside" in why
    (ctx / "trainval" / "2010_000001.mat").unlink()
    _, problems = context.list_records(voc, ctx)
    assert [(p.id, p.reason) for p in problems] == [
        ("2010_000001", "missing label file trainval/2010_000001.mat")]
    # a 59-class list that is not the task's is refused in one line
    (ctx / "59_labels.txt").write_text("1: cat\n2: dog\n")
    context.lookup.cache_clear()
    with pytest.raises(UserError, match="does not list the 59 classes"):
        context.list_records(voc, ctx)
    context.lookup.cache_clear()


def test_context_protocol(tmp_path):
    voc, ctx = synth.write_context(tmp_path / "raw", n_train=6, n_val=3, size=(32, 32))
    with pytest.raises(UserError, match="context needs --context-root as well as --voc-root"):
        ingest(IngestConfig(dataset="context", root=voc, out=tmp_path), **QUIET)
    r = ingest(IngestConfig(dataset="context", root=voc, context_root=ctx, out=tmp_path),
               **QUIET)
    assert r.rows == {"train": 6, "val": 3}
    data = tmp_path / "context"
    m = read_manifest(data).data
    assert m["num_classes"] == 60 and m["classes"][0] == "background"
    assert m["splits"]["train"]["ignore_pixels"] == 0  # no void in PASCAL-Context
    ckpt = tiny_fit(data, _cfg("ctx", "context", "train", "val"))
    res = evaluate(ckpt, data, "val", actors=1, log_to_mlflow=False, **QUIET)
    assert res.images == 3 and len(res.per_class) == 60


def test_fcn_run_passes_compute_hha_through_the_flow_to_ingest():
    """`fcn run --compute-hha` reaches the flow's ingest step: a flow parameter, an ingest
    config field, and (on a cluster) the `fcn ingest` job's flag."""
    import inspect

    from flows.cli import build_parser
    from flows.cli.pipeline import _pipeline_params
    from flows.pipeline import fcn_pipeline, ingest_flow

    args = build_parser().parse_args(
        ["run", "--config", "configs/nyud/fcn32s-hha.yaml", "--dataset", "nyud",
         "--root", "/data/nyud", "--compute-hha"])
    params = _pipeline_params(args)
    assert params["compute_hha"] is True
    assert set(params) <= set(inspect.signature(fcn_pipeline.fn).parameters)
    assert "compute_hha" in inspect.signature(ingest_flow.fn).parameters
    assert IngestConfig(dataset="nyud", root="/x", out="/y", compute_hha=True).compute_hha
    without = build_parser().parse_args(
        ["run", "--config", "configs/nyud/fcn32s-hha.yaml", "--dataset", "nyud",
         "--root", "/data/nyud"])
    assert "compute_hha" not in _pipeline_params(without)
    from flows.cli.data import ingest_args  # the cluster job's command line carries it

    assert "--compute-hha" in ingest_args(IngestConfig(dataset="nyud", root="/x", out="/y",
                                                       compute_hha=True))

