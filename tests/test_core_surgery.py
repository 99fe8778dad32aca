"""Net surgery: fc->conv equivalence (paper 3.1), VGG16 transplant, stage promotion."""

import pytest
import torch
import torchvision

from fcn_core import fcn8s, fcn8s_atonce, fcn16s, fcn32s, promote
from fcn_core.surgery import SurgeryError, convolutionalize, transplant_vgg16
from fcn_core.transforms import MEAN_BGR


@pytest.fixture(scope="module")
def vgg():
    torch.manual_seed(0)
    return torchvision.models.vgg16(weights=None).eval()


def test_convolutionalized_vgg16_gives_torchvisions_logits_on_224(vgg):
    conv, report = convolutionalize(vgg)
    assert conv.fc6.weight.shape == (4096, 512, 7, 7)
    assert conv.fc7.weight.shape == (4096, 4096, 1, 1)
    assert any(r.startswith("classifier.0.weight -> fc6.weight") for r in report.reshaped)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        expected = vgg(x)  # (2, 1000)
        got = conv.eval()(x)  # (2, 1000, 1, 1)
    assert got.shape == (2, 1000, 1, 1)
    torch.testing.assert_close(got[:, :, 0, 0], expected, rtol=1e-4, atol=1e-4)


def test_convolutionalized_vgg16_on_384_is_the_classifier_on_every_window(vgg):
    """384x384 -> a 6x6 map; cell (i, j) is torchvision's classifier on the 224x224 window
    at (32i, 32j), i.e. on the 7x7 block of pool5 features that window produces."""
    conv, _ = convolutionalize(vgg)
    x = torch.randn(1, 3, 384, 384)
    with torch.no_grad():
        scores = conv.eval()(x)
        pool5 = vgg.features(x)  # (1, 512, 12, 12)
    assert scores.shape == (1, 1000, 6, 6)
    for i in range(6):
        for j in range(6):
            window = pool5[:, :, i : i + 7, j : j + 7]
            with torch.no_grad():
                expected = vgg.classifier(torch.flatten(vgg.avgpool(window), 1))
            torch.testing.assert_close(scores[:, :, i, j], expected, rtol=1e-4, atol=1e-4)


def test_transplant_copies_reshapes_and_skips_with_a_report(vgg):
    model = fcn32s(width=1.0)
    sd = vgg.state_dict()
    report = transplant_vgg16(model, sd)
    assert torch.equal(model.features[0].weight, sd["features.0.weight"])
    assert torch.equal(model.fc6.weight, sd["classifier.0.weight"].reshape(4096, 512, 7, 7))
    assert torch.equal(model.fc7.weight, sd["classifier.3.weight"].reshape(4096, 4096, 1, 1))
    assert torch.equal(model.fc7.bias, sd["classifier.3.bias"])
    assert len(report.reshaped) == 2
    assert {s.split(":")[0] for s in report.skipped} == {"classifier.6.weight", "classifier.6.bias"}
    assert "heads.out.score_fr.weight" in report.initialised
    assert "copied 28" in str(report)  # 13 convs x 2 + fc6/fc7 biases


def test_transplant_refuses_mismatched_shapes_with_a_clear_error(vgg):
    small = fcn32s(width=0.5)
    with pytest.raises(SurgeryError, match=r"features\.0\.weight: shape \(64, 3, 3, 3\).*"
                                           r"\(32, 3, 3, 3\).*width=0\.5"):
        transplant_vgg16(small, vgg.state_dict())
    with pytest.raises(SurgeryError, match="lack"):
        transplant_vgg16(fcn32s(), {"features.0.weight": vgg.state_dict()["features.0.weight"]})


def test_transplant_into_rgbd_starts_depth_as_the_mean_colour_filter(vgg):
    """Reference nyud-fcn32s-color-d: conv1_1_bgrd[:, 3] = mean of the colour filters."""
    model = fcn32s(num_classes=40, in_channels=4)
    report = transplant_vgg16(model, vgg.state_dict())
    w = model.features[0].weight
    assert torch.equal(w[:, :3], vgg.state_dict()["features.0.weight"])
    torch.testing.assert_close(w[:, 3], vgg.state_dict()["features.0.weight"].mean(1))
    assert any("mean of the three colour filters" in a for a in report.adapted)
    # with the BGR re-expression, the mean is of the re-expressed filters
    model = fcn32s(num_classes=40, in_channels=4)
    transplant_vgg16(model, vgg.state_dict(), mean_bgr=MEAN_BGR["nyud"])
    w = model.features[0].weight
    torch.testing.assert_close(w[:, 3], w[:, :3].mean(1))


def test_hha_in_the_bgr_slots_is_re_expressed_like_colour(vgg):
    """HHA (file order, minus the HHA mean) in the slots where Caffe's VGG saw B, G, R: conv1_1
    sees what torchvision's saw for the picture whose B, G, R are the HHA channels. Without
    the re-expression its input would be ~57x too large (255 x ImageNet std)."""
    from fcn_core.transforms import MEAN_HHA

    model = fcn32s(num_classes=40)
    transplant_vgg16(model, vgg.state_dict(), mean_bgr=MEAN_HHA)
    hha = torch.rand(1, 3, 20, 20) * 255  # channels in file order
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    x_tv = (hha.flip(1) / 255 - mean) / std  # the RGB picture whose B, G, R are HHA 0, 1, 2
    x_ours = hha - torch.tensor(MEAN_HHA).view(1, 3, 1, 1)
    ours = torch.nn.functional.conv2d(x_ours, model.features[0].weight, model.features[0].bias)
    theirs = torch.nn.functional.conv2d(x_tv, vgg.features[0].weight, vgg.features[0].bias)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    raw = torch.nn.functional.conv2d(x_ours, vgg.features[0].weight, vgg.features[0].bias)
    assert raw.abs().mean() > 20 * theirs.abs().mean()  # what the un-adapted net was fed


def test_bgr_adaptation_makes_conv1_1_see_what_torchvision_saw(vgg):
    """With mean_bgr, conv1_1 on BGR-minus-mean [0, 255] input equals torchvision's conv1_1
    on the same picture normalised its own way (RGB in [0, 1], ImageNet mean/std)."""
    model = fcn32s()
    transplant_vgg16(model, vgg.state_dict(), mean_bgr=MEAN_BGR["voc"])
    rgb = torch.rand(1, 3, 20, 20) * 255
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    x_tv = (rgb / 255 - mean) / std
    x_ours = rgb.flip(1) - torch.tensor(MEAN_BGR["voc"]).view(1, 3, 1, 1)
    ours = torch.nn.functional.conv2d(x_ours, model.features[0].weight, model.features[0].bias)
    theirs = torch.nn.functional.conv2d(x_tv, vgg.features[0].weight, vgg.features[0].bias)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


def _trained_like(model):
    """Give every score layer non-zero weights, as after a stage of training."""
    torch.manual_seed(1)
    for name, m in model.named_modules():
        if name.split(".")[-1].startswith("score_"):
            torch.nn.init.normal_(m.weight, std=0.05)
            torch.nn.init.normal_(m.bias, std=0.05)
    return model.eval()


def _capture(model, layer_name):
    seen = {}
    dict(model.named_modules())[layer_name].register_forward_hook(
        lambda m, a, o: seen.update({"out": o.detach().clone()}))
    return seen


@pytest.mark.parametrize("src_builder", [fcn32s, fcn16s], ids=["32s->16s", "16s->8s"])
def test_promote_copies_everything_and_the_new_skip_adds_exactly_nothing(src_builder):
    src = _trained_like(src_builder(num_classes=5, width=0.125))
    dst = promote(src).eval()
    assert dst.config.variant == {"fcn32s": "fcn16s", "fcn16s": "fcn8s"}[src.config.variant]
    src_sd, dst_sd = src.state_dict(), dst.state_dict()
    shared = set(src_sd) & set(dst_sd)
    assert {k for k in src_sd if k not in dst_sd} <= {"heads.out.upscore.weight",
                                                       "heads.out.upscore16.weight"}
    for k in shared:
        assert torch.equal(src_sd[k], dst_sd[k]), k
    new_skip = "score_pool4" if src.stride == 32 else "score_pool3"
    skip = getattr(dst.heads["out"], new_skip)
    assert not skip.weight.any() and not skip.bias.any()

    x = torch.randn(2, 3, 70, 54) * 40
    fr_src, fr_dst = _capture(src, "heads.out.score_fr"), _capture(dst, "heads.out.score_fr")
    with torch.no_grad():
        s_src, s_dst = src(x), dst(x)
    # Exact: the coarse scores the new net starts from are the old net's.
    torch.testing.assert_close(fr_dst["out"], fr_src["out"], rtol=0, atol=0)
    # Exact: the new skip contributes nothing, whatever the pool features are.
    skip.register_forward_pre_hook(lambda m, a: (torch.randn_like(a[0]) * 1e3,))
    with torch.no_grad():
        torch.testing.assert_close(dst(x), s_dst, rtol=0, atol=0)
    # Scores: the two nets differ only in how they interpolate the same coarse scores
    # (bilinear 4/2 then 32/16 is not bilinear 64/32), so they agree closely, not bitwise.
    rel = (s_dst - s_src).abs().max() / s_src.abs().max()
    assert rel < 0.35, rel
    agree = (s_dst.argmax(1) == s_src.argmax(1)).float().mean()
    assert agree > 0.9, agree


def test_promote_chain_and_refusals():
    m8 = promote(promote(fcn32s(width=0.0625)))
    assert m8.config.variant == "fcn8s" and m8.offsets["score"] == 31
    with pytest.raises(ValueError, match="fcn8s"):
        promote(fcn8s(width=0.0625))
    with pytest.raises(ValueError, match="fcn8s_atonce"):
        promote(fcn8s_atonce(width=0.0625))


def test_promote_keeps_heads():
    src = fcn32s(width=0.0625, heads={"sem": 33, "geo": 3})
    dst = promote(src)
    out = dst(torch.randn(1, 3, 40, 40))
    assert set(out) == {"sem", "geo"} and out["sem"].shape[1] == 33
