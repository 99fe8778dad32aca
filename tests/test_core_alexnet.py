"""FCN-AlexNet (the paper's Table 1): the reference geometry, and fc -> conv equivalence with
torchvision's AlexNet classifier (random weights: nothing is downloaded)."""

import pytest
import torch
import torchvision

from fcn_core.alexnet import FCNAlexNet, fcn32s_alexnet, transplant_alexnet
from fcn_core.transforms import MEAN_BGR


def test_crop_offset_is_the_reference_18_and_every_size_is_scored():
    net = fcn32s_alexnet(num_classes=3, width=1 / 16).eval()
    assert net.offsets == {"score": 18}  # voc-fcn-alexnet's crop, from the coordinate map
    with torch.no_grad():
        for h, w in ((1, 1), (2, 37), (31, 33), (64, 65), (97, 70)):
            assert net(torch.zeros(1, 3, h, w)).shape == (1, 3, h, w), (h, w)


def test_fc_to_conv_equals_torchvisions_classifier_at_224():
    torch.manual_seed(0)
    tv = torchvision.models.alexnet(weights=None).eval()
    net = FCNAlexNet(num_classes=21).eval()
    copied = transplant_alexnet(net, tv.state_dict())
    assert len(copied) == 7
    x = torch.randn(2, 3, 224, 224)
    net.features[0].padding = (2, 2)  # torchvision's geometry: pool5 is 6x6, fc6 gives 1x1
    with torch.no_grad():
        fc7_tv = tv.classifier[:6](torch.flatten(tv.avgpool(tv.features(x)), 1))
        fc7 = net.score_input(x)
    assert fc7.shape == (2, 4096, 1, 1)
    torch.testing.assert_close(fc7[:, :, 0, 0], fc7_tv, rtol=1e-4, atol=1e-4)


def test_bgr_minus_mean_input_sees_what_torchvision_saw():
    torch.manual_seed(1)
    tv = torchvision.models.alexnet(weights=None).eval()
    net = FCNAlexNet(num_classes=21).eval()
    mean = MEAN_BGR["voc"]
    transplant_alexnet(net, tv.state_dict(), mean_bgr=mean)
    rgb = torch.rand(1, 3, 64, 64)  # [0, 1]
    tv_in = torchvision.transforms.functional.normalize(rgb, [0.485, 0.456, 0.406],
                                                        [0.229, 0.224, 0.225])
    bgr = rgb.flip(1) * 255 - torch.tensor(mean).view(1, 3, 1, 1)
    net.features[0].padding = (2, 2)
    with torch.no_grad():  # away from the zero padding (the mean here, ImageNet's mean there)
        torch.testing.assert_close(net.features[0](bgr)[..., 1:-1, 1:-1],
                                   tv.features[0](tv_in)[..., 1:-1, 1:-1], rtol=1e-4, atol=1e-3)


def test_a_state_dict_of_another_width_is_refused():
    from fcn_core.surgery import SurgeryError

    tv = torchvision.models.alexnet(weights=None)
    with pytest.raises(SurgeryError, match=r"features.0.weight .* does not fit"):
        transplant_alexnet(fcn32s_alexnet(width=0.5), tv.state_dict())
