"""Training details held to the reference code (plain torch, no Ray): the loss normalisation
of Caffe's SoftmaxWithLoss, fixed deconvolutions in every stage, and the sampling order."""

import json
from pathlib import Path

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


# ------------------------------------------------------ the paper's §3-4 training options

def test_class_weights_from_a_known_histogram():
    from fcn_core.losses import class_weights

    pixels = [10, 30, 0, 60]  # shares 0.1, 0.3, (absent), 0.6
    inv = class_weights(pixels, "inverse_frequency").tolist()
    assert inv == pytest.approx([1 / 0.3, 1 / 0.9, 0.0, 1 / 1.8])
    assert sum(f * w for f, w in zip([0.1, 0.3, 0, 0.6], inv, strict=True)) == pytest.approx(1)
    assert class_weights(pixels, "median_frequency").tolist() == pytest.approx([3, 1, 0, 0.5])
    assert class_weights(pixels, "none") is None
    with pytest.raises(ValueError, match="positive sum"):
        class_weights([0, 0], "inverse_frequency")


def test_weighted_loss_is_the_weighted_sum_of_pixel_losses():
    torch.manual_seed(0)
    scores = torch.randn(2, 3, 4, 5)
    target = torch.randint(0, 3, (2, 4, 5))
    target[0, 0, 0] = 255
    w = torch.tensor([0.5, 2.0, 1.0])
    logp = scores.log_softmax(1)
    valid = target != 255
    t = target.clamp(max=2)
    pix = -logp.gather(1, t[:, None])[:, 0] * w[t]
    want_sum = pix[valid].sum() / 2
    assert segmentation_loss(scores, target, weight=w) == pytest.approx(float(want_sum), rel=1e-5)
    want_norm = pix[valid].sum() / w[t][valid].sum()
    assert segmentation_loss(scores, target, weight=w, normalize=True) == \
        pytest.approx(float(want_norm), rel=1e-5)


def test_loss_sampling_drops_whole_cells_at_the_rate_asked_and_keeps_ignore_ignored():
    from fcn_core.losses import sample_loss_cells

    target = torch.ones(4, 64, 60, dtype=torch.long)
    target[:, :3, :] = 255  # already ignored: must stay so
    assert sample_loss_cells(target, 8, 1.0) is target
    g = torch.Generator().manual_seed(7)
    out = sample_loss_cells(target, 8, 0.5, g)
    assert (out[:, :3] == 255).all()
    cells = out[:, ::8, ::8] == 255  # a cell's top-left pixel (row 0 is ignored anyway)
    rows = out.reshape(4, 8, 8, 60)[:, :, 4:, :]  # every cell: its lower rows all agree
    for n in range(4):
        for i in range(1, 8):
            for j in range(8):
                block = out[n, 8 * i:8 * i + 8, 8 * j:8 * j + 8]
                assert (block == 255).all() or (block == 1).all()
    assert rows.numel() > 0
    dropped = (out[:, 8:, :] == 255).float().mean().item()  # cells below the ignored rows
    assert 0.4 < dropped < 0.6, dropped
    again = sample_loss_cells(target, 8, 0.5, torch.Generator().manual_seed(7))
    assert torch.equal(again, out) and cells.any()
    assert (sample_loss_cells(target, 8, 0.25, g)[:, 8:] == 255).float().mean() > 0.65


def test_sampled_labels_follow_seed_rank_and_step():
    from pipelines.train.step import sampled_labels

    labels = {"label": torch.zeros(2, 32, 32, dtype=torch.long), "depth": torch.ones(2, 32, 32)}
    a = sampled_labels(labels, 0.5, 8, 1337, 0, 10)
    assert torch.equal(a["label"], sampled_labels(labels, 0.5, 8, 1337, 0, 10)["label"])
    assert not torch.equal(a["label"], sampled_labels(labels, 0.5, 8, 1337, 0, 11)["label"])
    assert not torch.equal(a["label"], sampled_labels(labels, 0.5, 8, 1337, 1, 10)["label"])
    assert a["depth"] is labels["depth"]  # only label maps are sampled
    assert sampled_labels(labels, 1.0, 8, 1, 0, 0) is labels


def test_score_only_stage_trains_only_score_fr():
    cfg = TrainConfig(dataset="voc", width=1 / 16, optimizer="sgd", momentum=0.0,
                      stages=(StageConfig("32s", 1, 0.1, train="score_only"),))
    model = build_stage_model(cfg, cfg.stages[0], 21, None, log=lambda m: None)
    learning = {n for n, p in model.named_parameters() if p.requires_grad}
    assert learning == {"heads.out.score_fr.weight", "heads.out.score_fr.bias"}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = make_optimizer(model, cfg, cfg.stages[0])
    x = torch.randn(2, 3, 64, 64)
    train_step(model, opt, x, {"label": torch.randint(0, 21, (2, 64, 64))}, ["out"], True)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == learning  # the trunk and fc6/fc7 are the fixed VGG16 features


def test_jitter_moves_image_and_labels_together_and_pads_what_it_uncovers():
    from pipelines.shards import encode_png, training_batch

    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)
    label = rng.integers(0, 21, (20, 24), dtype=np.uint8)
    import io

    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    batch = {"image": np.array([buf.getvalue()], object),
             "label": np.array([encode_png(label)], object)}
    seen = set()
    for seed in range(12):
        b = training_batch(batch, seed=seed, jitter=4)
        img, lab, pad = b["image"][0], b["label"][0], b["pad"][0]
        assert img.shape == (20, 24, 3)
        shift = next((dy, dx) for dy in range(-4, 5) for dx in range(-4, 5)
                     if np.array_equal(lab[max(dy, 0):20 + min(dy, 0), max(dx, 0):24 + min(dx, 0)],
                                       label[max(-dy, 0):20 - max(dy, 0),
                                             max(-dx, 0):24 - max(dx, 0)]))
        dy, dx = shift
        inside = np.zeros((20, 24), bool)
        inside[max(dy, 0):20 + min(dy, 0), max(dx, 0):24 + min(dx, 0)] = True
        assert (lab[~inside] == 255).all() and (pad == ~inside).all()
        assert np.array_equal(img[inside], np.roll(image, (dy, dx), (0, 1))[inside])
        seen.add(shift)
    assert len(seen) > 3  # random, within +-4
    plain = training_batch(batch, seed=0)
    assert np.array_equal(plain["label"][0], label) and not plain["pad"][0].any()


def _encoded(image: np.ndarray, label: np.ndarray) -> dict[str, np.ndarray]:
    import io

    from PIL import Image

    from pipelines.shards import encode_png

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return {"image": np.array([buf.getvalue()], object),
            "label": np.array([encode_png(label)], object)}


def test_random_scale_and_crop_keep_image_and_labels_aligned():
    """random_scale resizes image (bilinear) and labels (nearest) by one factor per image;
    crop_size cuts the same window from both, padding (mean, label 255) where the scaled
    image is smaller."""
    from pipelines.shards import training_batch

    palette = np.array([[0, 0, 0], [250, 10, 10], [10, 250, 10], [10, 10, 250]], np.uint8)
    label = np.kron(np.arange(12, dtype=np.uint8).reshape(3, 4) % 4,
                    np.ones((8, 8), np.uint8))  # 24 x 32, blocks of 8
    batch = _encoded(palette[label], label)
    doubled = training_batch(batch, seed=0, scale=(2.0, 2.0))
    assert np.array_equal(doubled["label"][0], np.kron(label, np.ones((2, 2), np.uint8)))
    assert doubled["image"].shape == (1, 48, 64, 3)
    sizes = set()
    for seed in range(10):
        b = training_batch(batch, seed=seed, scale=(0.5, 2.0), crop=20)
        img, lab, pad = b["image"][0], b["label"][0], b["pad"][0]
        assert img.shape == (20, 20, 3) and lab.shape == (20, 20)
        assert ((lab == 255) == pad).all()  # padding is where the scaled image ran out
        # Two pixels away from block edges (the bilinear filter's reach when shrinking by
        # 2), every pixel's colour is its label's.
        t = torch.from_numpy(lab.astype(np.float32))[None, None]
        uniform = (torch.nn.functional.max_pool2d(t, 5, 1, 2) ==
                   -torch.nn.functional.max_pool2d(-t, 5, 1, 2))[0, 0].numpy() & ~pad
        uniform[:2], uniform[-2:], uniform[:, :2], uniform[:, -2:] = (False,) * 4  # unseen
        assert uniform.sum() > 20
        assert (np.abs(img[uniform].astype(int) - palette[lab[uniform]]) <= 2).all()
        rows = int((~pad).any(1).sum())
        sizes.add(rows)
    assert min(sizes) < 20 and 20 in sizes  # the scale varies: some come out shorter than the crop
    whole = training_batch(batch, seed=0, crop=40)  # bigger than the image: all of it
    assert np.array_equal(whole["label"][0][:24, :32], label)
    assert whole["pad"][0][24:].all() and whole["pad"][0][:, 32:].all()
    assert not whole["pad"][0][:24, :32].any()
    window = training_batch(batch, seed=3, crop=16)["label"][0]
    assert any(np.array_equal(window, label[y:y + 16, x:x + 16])
               for y in range(9) for x in range(17))


@pytest.mark.parametrize("backbone", ["alexnet", "googlenet"])
def test_other_trunks_start_from_their_torchvision_weights(tmp_path, backbone):
    """backbone: alexnet | googlenet builds that FCN-32s and loads a local torchvision state
    dict into all of it (fcn_core's transplant, whose exactness tests/test_core_alexnet.py and
    test_core_googlenet.py prove), with conv1 re-expressed for the dataset's mean."""
    import importlib

    import torchvision

    from fcn_core.models import build_model
    from fcn_core.transforms import MEAN_BGR

    torch.manual_seed(0)
    tv = getattr(torchvision.models, backbone)(
        **({"aux_logits": False, "init_weights": True} if backbone == "googlenet" else {}))
    weights = tmp_path / f"{backbone}.pth"
    torch.save(tv.state_dict(), weights)
    cfg = TrainConfig(dataset="voc", backbone=backbone, backbone_weights=str(weights),
                      stages=(StageConfig("32s", 1, 0.1),))
    said: list[str] = []
    model = build_stage_model(cfg, cfg.stages[0], 21, None, log=said.append)
    assert model.config.variant == f"fcn32s_{backbone}"
    assert "the classifier dropped" in said[0], said
    expected = build_model(f"fcn32s_{backbone}", num_classes=21)
    getattr(importlib.import_module(f"fcn_core.{backbone}"), f"transplant_{backbone}")(
        expected, tv.state_dict(), mean_bgr=MEAN_BGR["voc"])
    got, want = model.state_dict(), expected.state_dict()
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)
    trunk = "features.0.weight" if backbone == "alexnet" else "conv1.conv.weight"
    assert not torch.equal(got[trunk], build_model(f"fcn32s_{backbone}").state_dict()[trunk])


def test_a_fixed_googlenet_trunk_keeps_its_batch_norm_statistics():
    """train: score_only on FCN-GoogLeNet: the trunk's batch norms normalise with their
    running statistics and keep them, so only score_fr changes in a training step."""
    cfg = TrainConfig(dataset="voc", backbone="googlenet", width=1 / 8, optimizer="sgd",
                      momentum=0.0, stages=(StageConfig("32s", 1, 0.1, train="score_only"),))
    model = build_stage_model(cfg, cfg.stages[0], 21, None, log=lambda m: None)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = make_optimizer(model, cfg, cfg.stages[0])
    x = torch.randn(2, 3, 64, 64) * 50
    train_step(model, opt, x, {"label": torch.randint(0, 21, (2, 64, 64))}, ["out"], True)
    assert not model.conv1.bn.training and model.training
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == {"heads.out.score_fr.weight", "heads.out.score_fr.bias"}


@pytest.mark.parametrize("model_name, classifier", [
    ("deeplabv3_resnet50", "resnet50"), ("lraspp_mobilenet_v3_large", "mobilenet_v3_large"),
    ("pspnet_resnet50", "resnet50"), ("refinenet_resnet50", "resnet50")])
def test_a_successor_starts_from_its_backbones_torchvision_weights_and_learns_with_aux(
        tmp_path, model_name, classifier):
    """model: NAME builds torchvision's net and loads a local classification state dict into
    its backbone (classifier dropped, first conv re-expressed for BGR minus the mean, exact
    in eval mode); a training step adds the auxiliary loss where torchvision has one."""
    import torchvision

    from fcn_core.transforms import MEAN_BGR

    torch.manual_seed(0)
    tv = getattr(torchvision.models, classifier)().eval()
    weights = tmp_path / "w.pth"
    torch.save(tv.state_dict(), weights)
    cfg = TrainConfig(dataset="voc", model=model_name, backbone_weights=str(weights),
                      optimizer="sgd", momentum=0.0, batch_size=2,
                      stages=(StageConfig("train", 1, 0.01),))
    said: list[str] = []
    model = build_stage_model(cfg, cfg.stages[0], 21, None, log=said.append).eval()
    assert model.config.variant == model_name and "classifier dropped" in said[0], said
    rgb = torch.rand(1, 3, 40, 40)
    bgr = rgb.flip(1) * 255 - torch.tensor(MEAN_BGR["voc"]).view(1, 3, 1, 1)
    norm = (rgb - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / \
        torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    first = (lambda m: torch.nn.Sequential(m.conv1, m.bn1)) if classifier == "resnet50" else \
        (lambda m: m.features[0] if hasattr(m, "features") else m["0"])
    with torch.no_grad():
        ours = first(model.net.backbone)(bgr)
        theirs = first(tv)(norm)
    # Away from the border (zero padding is the mean colour in FCN's input, black in theirs)
    inner = (..., slice(2, -2), slice(2, -2))
    assert torch.allclose(ours[inner], theirs[inner], atol=1e-4), (ours - theirs).abs().max()

    has_aux = model_name not in ("lraspp_mobilenet_v3_large", "refinenet_resnet50")
    x, y = torch.randn(2, 3, 48, 48) * 50, {"label": torch.randint(0, 21, (2, 48, 48))}
    from fcn_core.losses import segmentation_loss

    def loss_of(scores: torch.Tensor) -> torch.Tensor:
        return segmentation_loss(scores, y["label"], normalize=True)

    model.train()
    torch.manual_seed(5)  # the same dropout masks in both forwards
    with torch.no_grad():
        out = model(x)
    assert isinstance(out, dict) == has_aux
    w_aux = 0.4 if model_name.startswith("pspnet") else 0.5  # the paper's; torchvision's
    expected = loss_of(out["out"]) + w_aux * loss_of(out["aux"]) if has_aux else loss_of(out)
    opt = make_optimizer(model, cfg, cfg.stages[0])
    torch.manual_seed(5)
    loss = train_step(model, opt, x, y, ["out"], True)
    assert loss == pytest.approx(float(expected), rel=1e-4)


def test_batch_norms_are_synchronised_across_gpu_workers_only():
    """Several GPU workers: every batch norm becomes a SyncBatchNorm (the same parameters,
    so the optimizer's references hold); one worker, a net without batch norm, or CPU
    workers (PyTorch's SyncBatchNorm refuses non-GPU modules) keep the net as it is."""
    from fcn_core.models import build_model
    from pipelines.train.step import sync_batch_norm

    net = build_model("lraspp_mobilenet_v3_large", num_classes=3)
    params = list(net.parameters())
    said: list[str] = []
    synced = sync_batch_norm(net, use_gpu=True, workers=2, log=said.append)
    kinds = {type(m).__name__ for m in synced.modules()}
    assert "SyncBatchNorm" in kinds and "BatchNorm2d" not in kinds
    assert list(synced.parameters()) == params
    assert said == ["batch norm: SyncBatchNorm across the 2 workers"]
    for use_gpu, workers in ((True, 1), (False, 2)):
        plain = build_model("lraspp_mobilenet_v3_large", num_classes=3)
        assert sync_batch_norm(plain, use_gpu, workers, log=said.append) is plain
        assert "SyncBatchNorm" not in {type(m).__name__ for m in plain.modules()}
    assert said[-1].startswith("batch norm: 2 CPU workers keep their own statistics")
    fcn = build_model("fcn8s", width=1 / 16)
    assert sync_batch_norm(fcn, True, 4, log=said.append) is fcn


@pytest.mark.parametrize("model_name, module, function", [
    ("segnet", "fcn_core.zoo.segnet", "transplant_vgg16_bn"),
    ("deeplab_largefov", "fcn_core.zoo.deeplab", "transplant_vgg16")])
def test_model_backbone_weights_go_to_that_nets_transplant(tmp_path, monkeypatch, model_name,
                                                            module, function):
    """model: segnet | deeplab_largefov with backbone_weights: the stage's net gets them
    through its own transplant (vgg16_bn; vgg16 with the classifier decimated), with the
    dataset's mean (the transplants themselves: tests/test_core_zoo.py)."""
    import importlib

    from fcn_core.transforms import MEAN_BGR

    weights = tmp_path / "w.pth"
    torch.save({"features.0.weight": torch.zeros(1)}, weights)
    seen = []
    monkeypatch.setattr(importlib.import_module(module), function,
                        lambda net, state, mean_bgr: seen.append((type(net).__name__, mean_bgr))
                        or ["a", "b"])
    cfg = TrainConfig(dataset="voc", model=model_name, width=1 / 16, batch_size=2,
                      backbone_weights=str(weights), stages=(StageConfig("train", 1, 0.01),))
    said: list[str] = []
    build_stage_model(cfg, cfg.stages[0], 21, None, log=said.append)
    assert seen == [({"segnet": "SegNet"}.get(model_name, "DeepLabLargeFOV"), MEAN_BGR["voc"])]
    assert said and "2 VGG16" in said[0], said


def _done(root, run_id: str, stage: str) -> None:
    from pipelines import storage
    from pipelines.train.worker import DONE_FILE

    storage.write_json(storage.join(str(root), run_id, stage, DONE_FILE), {
        "checkpoint": f"{root}/{stage}/final", "steps": 1, "metrics": {"mean_iu": 0.5}})


@pytest.mark.parametrize("waits", [True, False])
def test_a_chains_last_stage_returns_on_its_done_file_unless_it_waits_for_the_end(tmp_path,
                                                                                   waits):
    """In-process chains (``last_waits_for_end=False``) return the last stage as soon as its
    done file is written, while the workers shut down; ``join`` waits for that. A Ray job's
    chain (the default) returns when the job has ended."""
    import threading

    from pipelines.train.driver import PipelineRun, StageChain

    run, ended, release = PipelineRun("r1", str(tmp_path)), threading.Event(), threading.Event()

    def target() -> None:  # the training run: both stages' done files, then a slow shutdown
        _done(tmp_path, "r1", "32s")
        _done(tmp_path, "r1", "16s")
        release.wait(30)
        ended.set()

    chain = StageChain(run, ["32s", "16s"], None, target, last_waits_for_end=waits)
    assert chain.wait("32s", "m32").checkpoint.endswith("32s/final")
    if waits:
        threading.Timer(0.5, release.set).start()
        assert chain.wait("16s", "m16").steps == 1
        assert ended.is_set()
    else:
        res = chain.wait("16s", "m16")
        assert res.steps == 1 and res.metrics == {"mean_iu": 0.5}
        assert not ended.is_set()  # returned while the run was still shutting down
        release.set()
        chain.join()
        assert ended.is_set()


def test_ray_trains_controller_unpickles_our_callback_without_torch():
    """Ray Train's controller unpickles ``CheckpointLog``: importing it (and so the
    ``pipelines.train`` package) must not import torch and the model zoo, ~1.5 s of CPU in
    the controller while the first stage starts; the package's names still import on use."""
    import subprocess
    import sys
    from pathlib import Path

    code = ("import sys, pipelines.train.callbacks\n"
            "heavy = sorted(m for m in ('torch', 'fcn_core', 'pipelines.train.worker', "
            "'pipelines.train.driver', 'mlflow') if m in sys.modules)\n"
            "from pipelines.train import StageFailed, CHECKPOINT_FILE, run_stage\n"
            "print(heavy, StageFailed.__module__, CHECKPOINT_FILE, run_stage.__module__)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=120, cwd=Path(__file__).resolve().parents[1])
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split() == ["[]", "pipelines.train.driver", "checkpoint.pt",
                                "pipelines.train.driver"], r.stdout
    import pipelines.train

    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        pipelines.train.nope  # noqa: B018


def test_prestarted_processes_carry_ray_trains_runtime_env_in_both_serializations(monkeypatch):
    """The controller side's runtime env is serialized as the driver's ``runtime_env`` is; the
    workers' as Ray's core worker writes a merged one (compact, sorted keys). A user's
    RAY_TRAIN_* variable is part of both, as Ray Train propagates it."""
    from pipelines.prestart import runtime_env_infos, train_env_vars

    monkeypatch.setenv("RAY_TRAIN_V2_ENABLED", "1")
    env = train_env_vars()
    assert env["RAY_TRAIN_V2_ENABLED"] == "1" and env["RAY_WARN_BLOCKING_GET_INSIDE_ASYNC"] == "0"
    spaced, compact = runtime_env_infos({"B": "2", "A": "1"})
    assert json.loads(spaced.serialized_runtime_env) == {"env_vars": {"B": "2", "A": "1"}}
    assert compact.serialized_runtime_env == '{"env_vars":{"A":"1","B":"2"}}'


def test_no_prestart_without_a_local_ray_this_process_started():
    """Without a Ray (or connected to one another process started) nothing is asked for."""
    import subprocess
    import sys

    code = ("from pipelines.prestart import prestart_train_processes as p\n"
            "import ray\nassert not ray.is_initialized()\nprint(p(2))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == "None"


def test_the_warm_hook_imports_ahead_only_in_a_marked_process(tmp_path):
    """``pipelines.warm.hook`` runs in every worker process of a local Ray fcn started: an
    unmarked one (Ray Data tasks, evaluation actors, Ray Train's controller side) imports
    nothing; one that ``pipelines.prestart`` marked for a Ray Train worker imports torch,
    Ray Train and our training code, one marked for the controller Ray Train's controller and
    torch only (once no worker's process is still importing), or nothing once ``fit()`` is
    called; a marked process says it has connected (``.up``), which prestart waits for; a
    broken import never raises (Ray would end the worker)."""
    import os
    import subprocess
    import sys

    code = ("import os, sys\nfrom pipelines import warm\n"
            "d = os.environ['FCN_WARM_DIR']\n"
            "if sys.argv[1] == 'late': warm.fit_started(d)\n"
            "if sys.argv[1] == 'waiting':\n"  # a live worker's process still importing
            "    warm.mark(d, os.getppid()); warm.WAIT_S = 0.5\n"
            "    warm.mark(d, os.getpid(), 'controller')\n"
            "if sys.argv[1] in ('worker', 'controller', 'late'):\n"
            "    warm.mark(d, os.getpid(), sys.argv[1].replace('late', 'controller'))\n"
            "if sys.argv[1] == 'broken':\n"
            "    warm.mark(d, os.getpid())\n"
            "    warm.MODULES = {'worker': ('no_such_module_fcn',) + warm.MODULES['worker']}\n"
            "warm.hook()\n"
            "print(sorted(m for m in ('torch', 'torch._dynamo', 'ray.train.torch', "
            "'ray.train.v2._internal.execution.controller.controller', "
            "'pipelines.train.worker') if m in sys.modules), warm.up(d, os.getpid()))")
    env = {**os.environ, "FCN_WARM_DIR": str(tmp_path)}
    out = {}
    for case in ("plain", "worker", "controller", "broken", "waiting", "late"):
        r = subprocess.run([sys.executable, "-c", code, case], capture_output=True, text=True,
                           timeout=120, env=env)
        assert r.returncode == 0, r.stderr[-2000:]
        out[case] = r.stdout.strip()
    assert out["plain"] == "[] False"
    assert out["worker"] == ("['pipelines.train.worker', 'ray.train.torch', "
                             "'ray.train.v2._internal.execution.controller.controller', 'torch', "
                             "'torch._dynamo'] True")
    assert out["controller"].startswith("['ray.train.torch', "
                                        "'ray.train.v2._internal.execution.controller.controller'"
                                        ), out["controller"]
    assert "pipelines.train.worker" not in out["controller"]
    assert out["broken"] == "[] True"  # the first failure stops it, quietly
    # fit() was called before the controller's process was ready: it takes its actor at once
    assert out["late"] == "[] True"
    assert out["waiting"] == "[] True"  # gave up waiting for the worker: imports nothing
    from pipelines import warm

    with pytest.raises(ValueError, match="unknown kind"):
        warm.mark(str(tmp_path), 1, "driver")


def test_the_step_lines_eta_reads_as_time_left():
    from pipelines.train.worker import _eta

    assert [_eta(s) for s in (0, 0.4, 5, 59.6, 61, 3599, 3600, 7322)] == [
        "", "", "  ETA 5s", "  ETA 1m00s", "  ETA 1m01s", "  ETA 59m59s", "  ETA 1h00m",
        "  ETA 2h02m"]


def _means_on_rank(rank: int, cases: list[list[float]], init: str, out: str) -> None:
    import torch.distributed as dist

    from pipelines.train.step import mean_over_workers

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    try:
        means = [repr(mean_over_workers(values[rank])) for values in cases]
        Path(out, str(rank)).write_text(" ".join(means))
    finally:
        dist.destroy_process_group()


def test_every_worker_sees_the_same_mean_loss_so_all_stop_at_a_nan(tmp_path):
    """The divergence check: a NaN or inf on one worker reaches every worker (two real gloo
    ranks), so they all stop at the same step (one that went on would hang the others)."""
    import torch.multiprocessing as mp

    cases = [[1.0, 3.0], [1.0, float("nan")], [float("inf"), 1.0]]
    mp.spawn(_means_on_rank, args=(cases, f"file://{tmp_path / 'pg'}", str(tmp_path)),
             nprocs=2)
    assert [(tmp_path / str(r)).read_text() for r in (0, 1)] == ["2.0 nan inf"] * 2
