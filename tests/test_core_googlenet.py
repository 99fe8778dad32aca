"""FCN-GoogLeNet (the paper's Table 1): output aligned with the input at every size, and
torchvision's trunk loaded (random weights: nothing is downloaded)."""

import importlib

import pytest
import torch
import torchvision

from fcn_core.googlenet import FCNGoogLeNet, fcn32s_googlenet, transplant_googlenet
from fcn_core.transforms import MEAN_BGR


def test_crop_from_the_coordinate_map_and_every_size_is_scored():
    net = fcn32s_googlenet(num_classes=3, width=1 / 16).eval()
    assert net.offsets == {"score": 106}
    assert net.channels == 64  # 1024 / 16: the score layer reads inception5b
    with torch.no_grad():
        for h, w in ((1, 1), (5, 37), (33, 31), (64, 65)):
            assert net(torch.zeros(1, 3, h, w)).shape == (1, 3, h, w), (h, w)


def test_the_trunk_is_torchvisions_and_a_shifted_image_shifts_the_scores():
    torch.manual_seed(0)
    tv = torchvision.models.googlenet(weights=None, aux_logits=False, init_weights=True,
                                      transform_input=False).eval()
    net = FCNGoogLeNet(num_classes=4).eval()
    loaded = transplant_googlenet(net, tv.state_dict())
    assert "inception5b.branch4.1.conv.weight" in loaded and not any("fc." in k for k in loaded)
    x = torch.randn(1, 3, 224, 224)
    net.conv1.conv.padding = (3, 3)  # torchvision's own geometry
    with torch.no_grad():
        mine = net.score_input(x)
        g = importlib.import_module("torchvision.models.googlenet")
        theirs = x
        for name in ("conv1", "maxpool1", "conv2", "conv3", "maxpool2", "inception3a",
                     "inception3b", "maxpool3", "inception4a", "inception4b", "inception4c",
                     "inception4d", "inception4e", "maxpool4", "inception5a", "inception5b"):
            theirs = getattr(tv, name)(theirs)
    assert isinstance(tv.inception5b, g.Inception) and mine.shape == (1, 1024, 7, 7)
    torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-4)


def test_bgr_minus_mean_is_folded_into_conv1_and_its_batch_norm():
    torch.manual_seed(2)
    tv = torchvision.models.googlenet(weights=None, aux_logits=False, init_weights=True,
                                      transform_input=False).eval()
    for m in tv.modules():  # non-trivial running statistics
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 2)
    net = FCNGoogLeNet().eval()
    mean = MEAN_BGR["voc"]
    transplant_googlenet(net, tv.state_dict(), mean_bgr=mean)
    net.conv1.conv.padding = (3, 3)
    rgb = torch.rand(1, 3, 64, 64)
    tv_in = torchvision.transforms.functional.normalize(rgb, [0.485, 0.456, 0.406],
                                                        [0.229, 0.224, 0.225])
    bgr = rgb.flip(1) * 255 - torch.tensor(mean).view(1, 3, 1, 1)
    with torch.no_grad():  # away from the zero padding
        torch.testing.assert_close(net.conv1(bgr)[..., 2:-2, 2:-2],
                                   tv.conv1(tv_in)[..., 2:-2, 2:-2], rtol=1e-4, atol=1e-3)


def test_a_trunk_of_another_width_is_refused():
    from fcn_core.surgery import SurgeryError

    tv = torchvision.models.googlenet(weights=None, aux_logits=False, init_weights=True)
    with pytest.raises(SurgeryError, match="does not fit"):
        transplant_googlenet(fcn32s_googlenet(width=0.5), tv.state_dict())
