"""Training details held to the reference code (plain torch, no Ray): the loss normalisation
of Caffe's SoftmaxWithLoss, fixed deconvolutions in every stage, and the sampling order."""

import numpy as np
import pytest
import torch

from fcn_core.fcn import fcn32s
from fcn_core.losses import segmentation_loss
from pipelines.config import StageConfig, TrainConfig
from pipelines.ingest import IngestConfig, ingest
from pipelines.shards import read_split_table
from pipelines.sources import synthetic as synth
from pipelines.train.checkpoint import write_checkpoint
from pipelines.train.sampling import RowSampler, step_indices
from pipelines.train.step import build_stage_model, make_optimizer, train_step

# ------------------------------------------------------------------------------ the loss

def test_summed_loss_is_divided_by_the_batch_size_as_caffe_does():
    """Caffe's SoftmaxWithLoss with normalize: false divides the pixel sum by N."""
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(3, 5, 6, 7, generator=g)
    target = torch.randint(0, 5, (3, 6, 7), generator=g)
    target[0, :2] = 255
    per_image = [segmentation_loss(scores[i:i + 1], target[i:i + 1]) for i in range(3)]
    batch = segmentation_loss(scores, target)
    torch.testing.assert_close(batch, sum(per_image) / 3)
    # batch 1 is the plain sum over valid pixels
    s0 = torch.nn.functional.cross_entropy(scores[:1], target[:1], ignore_index=255,
                                           reduction="sum")
    torch.testing.assert_close(per_image[0], s0)
    # normalize=True: the mean over the batch's valid pixels
    valid = (target != 255).sum()
    torch.testing.assert_close(segmentation_loss(scores, target, normalize=True),
                               sum(p * 1 for p in per_image) / valid)


# ------------------------------------------------------------- fixed deconvolutions

def _cfg(**kw):
    return TrainConfig(name="t", dataset="voc", width=1 / 16, workers=1, momentum=0.9,
                       stages=(StageConfig("32s", 2, 0.1), StageConfig("16s", 2, 0.1),
                               StageConfig("8s", 2, 0.1)), **kw)


@pytest.mark.parametrize("learn", [False, True])
def test_promoted_stages_keep_deconvolutions_fixed_unless_asked(tmp_path, learn):
    cfg = _cfg(learn_upsampling=learn)
    torch.manual_seed(0)
    m32 = fcn32s(num_classes=21, width=1 / 16)
    ckpt = write_checkpoint(tmp_path / "32s.pt", m32)
    m16 = build_stage_model(cfg, cfg.stages[1], 21, ckpt, log=lambda m: None)
    ckpt16 = write_checkpoint(tmp_path / "16s.pt", m16)
    m8 = build_stage_model(cfg, cfg.stages[2], 21, ckpt16, log=lambda m: None)
    for model, learnable in ((m16, ["upscore2"]), (m8, ["upscore2", "upscore_pool4"])):
        grads = {n: p.requires_grad for n, p in model.named_parameters() if "upscore" in n}
        expect = {n: learn and any(f".{k}." in n for k in learnable) for n in grads}
        assert grads == expect
        opt = make_optimizer(model, cfg, cfg.stages[1])
        in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
        named = dict(model.named_parameters())
        assert all((id(named[n]) in in_opt) == expect[n] for n in grads)
    # a step moves the skip's score layers but leaves every fixed deconvolution as it was
    before = {n: p.detach().clone() for n, p in m8.named_parameters()}
    opt = make_optimizer(m8, cfg, cfg.stages[2])
    x = torch.randn(1, 3, 32, 32)
    y = {"label": torch.randint(0, 21, (1, 32, 32))}
    train_step(m8, opt, x, y, ["out"], normalize=True)
    after = dict(m8.named_parameters())
    assert not torch.equal(before["heads.out.score_pool3.weight"],
                           after["heads.out.score_pool3.weight"])
    for n in ("heads.out.upscore2.weight", "heads.out.upscore_pool4.weight"):
        assert torch.equal(before[n], after[n].detach()) != learn, n
    assert torch.equal(before["heads.out.upscore8.weight"],
                       after["heads.out.upscore8.weight"].detach())


def test_atonce_from_scratch_keeps_deconvolutions_fixed():
    cfg = TrainConfig(name="t", dataset="voc", width=1 / 16, workers=1,
                      learn_upsampling=False, stages=(StageConfig("8s-atonce", 2, 0.1),))
    m = build_stage_model(cfg, cfg.stages[0], 21, None, log=lambda m: None)
    assert not [n for n, p in m.named_parameters() if "upscore" in n and p.requires_grad]


# ------------------------------------------------------------------------- sampling

def test_random_sampling_draws_with_replacement_reproducibly():
    n, b, steps = 50, 2, 400
    draws = np.concatenate([step_indices(n, s, b, "random", 1337) for s in range(steps)])
    again = np.concatenate([step_indices(n, s, b, "random", 1337) for s in range(steps)])
    other = np.concatenate([step_indices(n, s, b, "random", 1338) for s in range(steps)])
    assert np.array_equal(draws, again) and not np.array_equal(draws, other)
    assert draws.min() >= 0 and draws.max() < n
    first = draws[:n]
    assert len(set(first.tolist())) < n  # with replacement: repeats within n draws
    counts = np.bincount(draws, minlength=n)  # 800 draws over 50 rows: all seen, none hogs
    assert counts.min() > 0 and counts.max() < 40
    # ranks draw differently; a step is recomputed identically (resume)
    assert not np.array_equal(step_indices(n, 7, b, "random", 1337, rank=1),
                              step_indices(n, 7, b, "random", 1337, rank=0))


def test_shuffle_sampling_visits_every_row_once_per_epoch():
    n, b = 10, 3
    seq = np.concatenate([step_indices(n, s, b, "shuffle", 5) for s in range(10)])
    epochs = seq[:30].reshape(3, 10)
    for e in epochs:
        assert sorted(e.tolist()) == list(range(n))
    assert not np.array_equal(epochs[0], epochs[1])
    assert not np.array_equal(epochs[0], np.arange(n))
    with pytest.raises(ValueError, match="mode must be one of"):
        step_indices(n, 0, b, "stream", 5)


@pytest.mark.usefixtures("ray_local")
def test_sampled_ids_are_not_file_order_and_follow_the_seed(tmp_path):
    """Shard rows as the worker holds them: the ids each step sees are not the stored order,
    and the same seed gives the same ids (a resumed step too)."""
    raw = synth.write_voc(tmp_path / "raw", n_train=24, n_val=2, size=(16, 16))
    ingest(IngestConfig(dataset="voc", root=raw, out=tmp_path / "out"), log=lambda m: None)
    table = read_split_table(tmp_path / "out" / "voc", "train")
    columns = {c: table[c].to_pylist() for c in ("id", "image", "label")}
    stored = columns["id"]

    def ids(mode, seed, steps=24, start=0):
        s = RowSampler(columns, mode, seed, batch_size=1)
        return [s.batch(k)["id"][0] for k in range(start, start + steps)]

    for mode in ("random", "shuffle"):
        a = ids(mode, 1337)
        assert a != stored and a == ids(mode, 1337) and a != ids(mode, 7)
        assert ids(mode, 1337, steps=10, start=14) == a[14:]
    assert sorted(ids("shuffle", 1337)) == sorted(stored)
    batch = RowSampler(columns, "random", 1, batch_size=3).batch(0)
    assert batch["image"].dtype == object and len(batch["image"]) == 3


def test_workers_read_their_shares_from_the_shards_every_row_once(tmp_path):
    """The in-memory samplers' rows come straight from the shards: the shares of any number
    of workers cover every row of the split exactly once, each worker a contiguous share
    (sizes within one row), with the bytes as stored; a column a dataset lacks is None."""
    from pipelines.shards import read_manifest
    from pipelines.train.sampling import rows_from_shards, share

    raw = synth.write_voc(tmp_path / "raw", n_train=23, n_val=2, size=(16, 16))
    ingest(IngestConfig(dataset="voc", root=raw, out=tmp_path / "out", shard_rows=5),
           log=lambda m: None)
    m = read_manifest(tmp_path / "out" / "voc")
    shards = m.shards("train")
    assert len(shards) == 5 and sum(n for _, n in shards) == 23
    table = read_split_table(tmp_path / "out" / "voc", "train")
    stored = dict(zip(table["id"].to_pylist(), table["image"].to_pylist(), strict=True))
    for world in (1, 2, 3, 4, 23):
        seen: list[str] = []
        for rank in range(world):
            got = rows_from_shards(shards, rank, world, ["id", "image", "hha"])
            lo, hi = share(23, rank, world)
            assert len(got["id"]) == hi - lo >= 23 // world
            assert got["hha"] == [None] * (hi - lo)  # VOC rows have no HHA
            assert all(stored[i] == b for i, b in zip(got["id"], got["image"], strict=True))
            seen += got["id"]
        assert seen == table["id"].to_pylist()  # every row once, in the shards' order
