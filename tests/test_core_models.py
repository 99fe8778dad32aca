"""fcn_core.build_model: one table of nets, each giving (N, C, H, W) scores for any H, W."""

import pytest
import torch

from fcn_core import build_model
from fcn_core.models import NAMES


@pytest.mark.parametrize("name", NAMES)
def test_every_net_scores_every_pixel_at_odd_sizes(name):
    net = build_model(name, num_classes=5, width=1 / 16).eval()
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

    assert main(["describe", "--variant", name, "--width", "0.0625", "--size", "64x48"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"{name}  width=0.0625") and "GMAC per image" in out
