"""fcn_core.build_model: one table of nets, each giving (N, C, H, W) scores for any H, W."""

import pytest
import torch

from fcn_core import build_model
from fcn_core.models import NAMES, SCALABLE


def _width(name: str) -> float:
    return 1 / 16 if name in SCALABLE else 1.0  # torchvision's nets have no multiplier


@pytest.mark.parametrize("name", NAMES)
def test_every_net_scores_every_pixel_at_odd_sizes(name):
    net = build_model(name, num_classes=5, width=_width(name)).eval()
    for h, w in ((1, 1), (17, 31), (33, 8)):
        with torch.no_grad():
            out = net(torch.zeros(1, 3, h, w))
        assert out.shape == (1, 5, h, w), (name, h, w)


def test_heads_in_channels_and_unknown_names():
    net = build_model("fcn16s", heads={"semantic": 33, "geometric": 3}, in_channels=4,
                      width=1 / 16).eval()
    with torch.no_grad():
        out = net(torch.zeros(2, 4, 40, 44))
    assert {k: tuple(v.shape) for k, v in out.items()} == {
        "semantic": (2, 33, 40, 44), "geometric": (2, 3, 40, 44)}
    with pytest.raises(ValueError, match="name must be one of fcn32s, fcn16s, fcn8s"):
        build_model("fcn4s")


@pytest.mark.parametrize("name", NAMES)
def test_fcn_describe_works_for_every_name(name, capsys):
    from flows.cli import main

    w = _width(name)
    assert main(["describe", "--variant", name, "--width", str(w), "--size", "64x48"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"{name}  width={w}") and "GMAC per image" in out


def test_fcn_describe_names_the_trunk_as_the_reference_does(capsys):
    """torchvision's index (what checkpoints and weights use) and the prototxt's name, for a
    VGG16 FCN only (DeepLab's trunk is laid out otherwise); every column stays apart."""
    import re

    from flows.cli import main

    assert main(["describe", "--variant", "fcn8s", "--width", "0.0625", "--size", "64x48"]) == 0
    lines = capsys.readouterr().out.splitlines()
    names = [ln.split("  ")[0] for ln in lines[2:] if ln.startswith("features.")]
    assert names[:3] == ["features.0 (conv1_1)", "features.2 (conv1_2)", "features.4 (pool1)"]
    assert names[-2:] == ["features.28 (conv5_3)", "features.30 (pool5)"] and len(names) == 18
    assert any(re.match(r"^fc6 +FullyConvolutional +\(1, 256, ", ln) for ln in lines), lines
    assert main(["describe", "--variant", "deeplab_largefov", "--width", "0.0625", "--size",
                 "64x48"]) == 0
    assert "(conv1_1)" not in capsys.readouterr().out


@pytest.mark.parametrize("name", [n for n in NAMES if n not in SCALABLE])
def test_torchvision_nets_are_built_without_downloading_and_refuse_what_they_lack(
        name, monkeypatch):
    """torchvision's builders default to downloading ImageNet backbone weights: the table
    builds them (and the nets on torchvision's ResNet) with none, so nothing is fetched (a
    fetch would fail here), and their aux classifier is there where they have one."""
    import torch.hub

    def no_download(*a, **k):
        raise AssertionError(f"{name} tried to download {a[:1]}")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_download)
    net = build_model(name, num_classes=4).eval()
    with torch.no_grad():
        out, aux = net.scores_and_aux(torch.zeros(1, 3, 21, 19)) \
            if hasattr(net, "scores_and_aux") else (net(torch.zeros(1, 3, 21, 19)), None)
    assert out.shape == (1, 4, 21, 19)
    assert (aux is None) == (name in ("lraspp_mobilenet_v3_large", "deeplabv3plus_resnet50",
                                      "refinenet_resnet50"))
    if aux is not None:
        assert aux.shape == (1, 4, 21, 19)
    assert net.config.variant == name
    with pytest.raises(ValueError, match="has no width multiplier"):
        build_model(name, width=0.5)
    with pytest.raises(ValueError, match="reads 3-channel images"):
        build_model(name, in_channels=4)
    with pytest.raises(ValueError, match="has one score head"):
        build_model(name, heads={"semantic": 33, "geometric": 3})
