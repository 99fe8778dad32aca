"""NYUD nets as the reference builds them: late fusion averages the streams' scores before
one upsampling, starts from two trained FCN-32s nets, and each stream's conv1_1 is
re-expressed for what sits in its BGR slots."""

import pytest
import torch

from fcn_core.fcn import LateFusion, crop, fcn32s
from fcn_core.transforms import MEAN_BGR, MEAN_HHA
from pipelines.config import StageConfig, TrainConfig
from pipelines.errors import UserError
from pipelines.train import step
from pipelines.train.checkpoint import load_model, write_checkpoint


def _trained_like(net, seed):
    torch.manual_seed(seed)
    for name, p in net.named_parameters():
        if "upscore" not in name:
            p.data.normal_(0, 0.05)
    return net.eval()


def test_late_fusion_is_the_average_of_score_fr_upsampled_once():
    color = _trained_like(fcn32s(num_classes=5, width=1 / 16), 1)
    hha = _trained_like(fcn32s(num_classes=5, width=1 / 16), 2)
    net = LateFusion(color, hha).eval()
    x = torch.randn(2, 6, 45, 37)

    def score_fr(fcn, xi):  # (N, 5, h, w): the stream up to its score_fr
        from fcn_core.vgg import run_features
        *_, pool5 = run_features(fcn.features, xi)
        fc7 = fcn.relu7(fcn.fc7(fcn.relu6(fcn.fc6(pool5))))
        return fcn.heads["out"].score_fr(fc7)

    fused = 0.5 * score_fr(color, x[:, :3]) + 0.5 * score_fr(hha, x[:, 3:])  # score_fused
    want = crop(color.heads["out"].upscore(fused), color.offsets["score"], 45, 37)
    with torch.no_grad():
        got = net(x)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(got, color(x[:, :3]) + hha(x[:, 3:]))  # not the sum


def test_fusion_init_starts_from_two_trained_32s_nets(tmp_path):
    color = _trained_like(fcn32s(num_classes=40, width=1 / 16), 1)
    hha = _trained_like(fcn32s(num_classes=40, width=1 / 16), 2)
    init = {"color": write_checkpoint(tmp_path / "c.pt", color),
            "hha": write_checkpoint(tmp_path / "h.pt", hha)}
    cfg = TrainConfig(name="f", dataset="nyud", input="rgb-hha", width=1 / 16, workers=1,
                      fusion_init=init, learn_upsampling=False,
                      stages=(StageConfig("32s", 2, 1e-12), StageConfig("16s", 2, 1e-14)))
    net = step.build_stage_model(cfg, cfg.stages[0], 40, None, log=lambda m: None)
    assert isinstance(net, LateFusion)
    for stream, src in (("color", color), ("hha", hha)):
        got = getattr(net, stream).state_dict()
        for k, v in src.state_dict().items():
            assert torch.equal(got[k], v), (stream, k)
    # saved and promoted as one net: the 16s stage starts from it
    ckpt = write_checkpoint(tmp_path / "fused.pt", net)
    assert isinstance(load_model(ckpt), LateFusion)
    net16 = step.build_stage_model(cfg, cfg.stages[1], 40, ckpt, log=lambda m: None)
    assert isinstance(net16, LateFusion) and net16.config.variant == "fcn16s"
    assert not [n for n, p in net16.named_parameters() if "upscore" in n and p.requires_grad]
    # streams that differ are refused in one line
    other = write_checkpoint(tmp_path / "o.pt", fcn32s(num_classes=21, width=1 / 16))
    bad = TrainConfig(name="f", dataset="nyud", input="rgb-hha", width=1 / 16, workers=1,
                      fusion_init={"color": init["color"], "hha": other},
                      stages=(StageConfig("32s", 2, 1e-12),))
    with pytest.raises(UserError, match="the colour and HHA nets differ"):
        step.build_stage_model(bad, bad.stages[0], 40, None, log=lambda m: None)


@pytest.mark.parametrize(("input", "means"), [
    ("rgb", [MEAN_BGR["nyud"]]), ("hha", [MEAN_HHA]), ("rgbd", [MEAN_BGR["nyud"]]),
    ("rgb-hha", [MEAN_BGR["nyud"], MEAN_HHA])])
def test_each_stream_is_re_expressed_for_what_sits_in_its_bgr_slots(tmp_path, monkeypatch,
                                                                      input, means):
    weights = tmp_path / "vgg16.pth"
    torch.save({"features.0.weight": torch.zeros(1)}, weights)
    seen = []
    monkeypatch.setattr(step, "transplant_vgg16",
                        lambda net, state, mean_bgr: seen.append(mean_bgr) or "ok")
    cfg = TrainConfig(name="m", dataset="nyud", input=input, width=1 / 16, workers=1,
                      backbone_weights=str(weights), stages=(StageConfig("32s", 2, 1e-10),))
    step.build_stage_model(cfg, cfg.stages[0], 40, None, log=lambda m: None)
    assert seen == means
