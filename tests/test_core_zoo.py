"""The successors of fcn_core/zoo/ written here (U-Net, SegNet): what makes each what it is.
Output sizes at odd inputs are tests/test_core_models.py's, for every net of the table."""

import pytest
import torch

from fcn_core.models import build_model


def test_segnet_unpooling_puts_each_value_back_at_its_argmax():
    """A hand-built case: the encoder's 2x2 pooling keeps the argmax of each window; the
    decoder's unpooling (with those indices) writes the pooled value there, zeros elsewhere."""
    net = build_model("segnet", num_classes=2, width=1 / 16)
    pool = next(m for m in net.features if isinstance(m, torch.nn.MaxPool2d))
    x = torch.tensor([[[[1., 5., 0., 2.],
                        [3., 4., 7., 1.],
                        [9., 0., 2., 2.],
                        [1., 8., 3., 6.]]]])
    pooled, idx = pool(x)
    assert pooled.tolist() == [[[[5., 7.], [9., 6.]]]]
    up = net.unpool(pooled * 10, idx, output_size=x.shape[-2:])
    assert up.tolist() == [[[[0., 50., 0., 0.],
                             [0., 0., 70., 0.],
                             [90., 0., 0., 0.],
                             [0., 0., 0., 60.]]]]


def test_segnet_decoder_uses_the_encoders_indices_at_odd_sizes():
    """Odd sizes: each unpooling restores the size its pooling saw (not twice the pooled)."""
    net = build_model("segnet", num_classes=3, width=1 / 16).eval()
    x = torch.randn(1, 3, 45, 37)
    with torch.no_grad():
        _, pools = net.encode(torch.nn.functional.pad(x, (0, 27, 0, 19)))
        out = net(x)
    assert [tuple(s[-2:]) for _, s in pools] == [(64, 64), (32, 32), (16, 16), (8, 8), (4, 4)]
    assert out.shape == (1, 3, 45, 37)


def test_segnet_loads_torchvision_vgg16_bn_into_its_encoder():
    import torchvision

    from fcn_core.zoo.segnet import transplant_vgg16_bn

    tv = torchvision.models.vgg16_bn()
    net = build_model("segnet", num_classes=21)
    loaded = transplant_vgg16_bn(net, tv.state_dict())
    assert len(loaded) == 13 * 7  # conv weight, bias; BN weight, bias, mean, var, count
    got = net.features.state_dict()
    assert all(torch.equal(got[k], tv.state_dict()[f"features.{k}"]) for k in loaded)
    from fcn_core.surgery import SurgeryError

    with pytest.raises(SurgeryError, match="does not fit"):
        transplant_vgg16_bn(build_model("segnet", width=0.5), tv.state_dict())


def test_unet_concatenates_the_contracting_maps_and_crops_back():
    net = build_model("unet", num_classes=4, width=1 / 16).eval()
    assert [m[0].in_channels for m in net.up_conv] == [64, 32, 16, 8]  # 2 x the skip's
    seen = []
    net.up_conv[-1].register_forward_hook(lambda m, a, o: seen.append(tuple(a[0].shape)))
    with torch.no_grad():
        out = net(torch.randn(2, 3, 17, 30))
    assert seen == [(2, 8, 32, 32)]  # padded to 32 x 32, the first level's 4 + 4 channels
    assert out.shape == (2, 4, 17, 30)


@pytest.mark.parametrize("h, w", [(1, 1), (8, 8), (9, 17), (64, 45), (100, 3)])
def test_deeplab_largefov_scores_at_output_stride_8(h, w):
    net = build_model("deeplab_largefov", num_classes=3, width=1 / 16).eval()
    x = torch.randn(1, 3, h, w)
    with torch.no_grad():
        coarse, out = net.coarse(x), net(x)
    assert coarse.shape[-2:] == (-(-h // 8), -(-w // 8))  # ceil(H/8) x ceil(W/8)
    assert out.shape == (1, 3, h, w)
    assert net.fc6.dilation == (12, 12) and net.fc6.kernel_size == (3, 3)
    assert [m.dilation for m in net.features if isinstance(m, torch.nn.Conv2d)][-3:] == \
        [(2, 2)] * 3


def test_deeplab_largefov_decimates_vgg16s_classifier_as_deeplab_did():
    import torchvision

    from fcn_core.zoo.deeplab import transplant_vgg16

    tv = torchvision.models.vgg16().state_dict()
    net = build_model("deeplab_largefov", num_classes=21)
    loaded = transplant_vgg16(net, tv)
    assert len(loaded) == 26 + 4
    fc6 = tv["classifier.0.weight"].view(4096, 512, 7, 7)
    assert torch.equal(net.fc6.weight, fc6[::4, :, ::3, ::3])  # taps 0, 3, 6
    assert torch.equal(net.fc7.weight[:, :, 0, 0], tv["classifier.3.weight"][::4, ::4])
    assert torch.equal(net.features[28].weight, tv["features.28.weight"])


def test_pspnet_pools_into_the_papers_bins_and_has_an_aux_head_in_training():
    net = build_model("pspnet_resnet50", num_classes=5).eval()
    seen = []
    for stage in net.net.ppm.stages:
        stage[0].register_forward_hook(lambda m, a, o: seen.append(tuple(o.shape[-2:])))
    x = torch.randn(2, 3, 57, 41)
    with torch.no_grad():
        out = net(x)
        feats = net.net.backbone(x)
    assert seen == [(1, 1), (2, 2), (3, 3), (6, 6)]
    assert feats["out"].shape[-2:] == (8, 6)  # output stride 8: ceil(57/8), ceil(41/8)
    assert feats["out"].shape[1] == 2048 and feats["aux"].shape[1] == 1024
    assert out.shape == (2, 5, 57, 41)
    net.train()
    both = net(x)
    assert set(both) == {"out", "aux"} and both["aux"].shape == (2, 5, 57, 41)
    assert net.aux_weight == 0.4


def test_deeplabv3plus_decodes_aspp_with_the_stride_4_features():
    net = build_model("deeplabv3plus_resnet50", num_classes=5).eval()
    seen = {}
    net.net.low.register_forward_hook(lambda m, a, o: seen.update(low=tuple(o.shape)))
    net.net.aspp.register_forward_hook(lambda m, a, o: seen.update(aspp=tuple(o.shape)))
    with torch.no_grad():
        out = net(torch.randn(2, 3, 67, 45))
    assert seen == {"low": (2, 48, 17, 12), "aspp": (2, 256, 5, 3)}  # strides 4 and 16
    assert [c[0].dilation for c in net.net.aspp.convs[1:4]] == [(6, 6), (12, 12), (18, 18)]
    assert out.shape == (2, 5, 67, 45)


def test_refinenet_cascades_four_blocks_from_stride_32_to_4():
    """RefineNet-4 refines layer4 alone (512 channels, no fusion); RefineNet-3..1 fuse their
    level with the coarser block's output at the finer size (256 channels); each chained
    residual pooling has the paper's two 5x5 pool + 3x3 conv blocks; scores at stride 4."""
    from fcn_core.zoo.refinenet import ChainedResidualPooling, ResidualConvUnit

    net = build_model("refinenet_resnet50", num_classes=5).eval()
    seen = []
    for block in net.net.refine:
        block.register_forward_hook(lambda m, a, o: seen.append(
            ([tuple(t.shape[1:]) for t in a], tuple(o.shape[1:]))))
    with torch.no_grad():
        out = net(torch.randn(1, 3, 67, 45))
    # Ceil sizes at strides 4, 8, 16, 32: (17, 12), (9, 6), (5, 3), (3, 2); called 4, 3, 2, 1
    assert seen == [([(512, 3, 2)], (512, 3, 2)),
                    ([(256, 5, 3), (512, 3, 2)], (256, 5, 3)),
                    ([(256, 9, 6), (256, 5, 3)], (256, 9, 6)),
                    ([(256, 17, 12), (256, 9, 6)], (256, 17, 12))]
    assert out.shape == (1, 5, 67, 45)
    assert len(net.net.refine[3].fuse) == 0 and len(net.net.refine[0].fuse) == 2
    crp = net.net.refine[0].crp
    assert isinstance(crp, ChainedResidualPooling) and len(crp.convs) == 2
    assert (crp.pool.kernel_size, crp.pool.stride) == (5, 1)
    assert [type(m) for m in net.net.refine[0].rcus[1]] == [ResidualConvUnit] * 2


def test_refinenet_units_are_residual_and_pooling_is_chained():
    """An RCU with zeroed convolutions is the identity; the CRP sums the ReLU'd input and
    every block of the chain, each block pooling the previous block's output."""
    from fcn_core.zoo.refinenet import ChainedResidualPooling, ResidualConvUnit

    rcu = ResidualConvUnit(4)
    for p in rcu.parameters():
        torch.nn.init.zeros_(p)
    x = torch.randn(1, 4, 7, 9)
    assert torch.equal(rcu(x), x)
    crp = ChainedResidualPooling(2)
    for conv in crp.convs:  # identity convolutions: each block is a 5x5 max pool
        torch.nn.init.zeros_(conv.weight)
        conv.weight.data[0, 0, 1, 1] = conv.weight.data[1, 1, 1, 1] = 1
    x = torch.randn(1, 2, 11, 13)
    r = x.relu()
    p1 = torch.nn.functional.max_pool2d(r, 5, 1, 2)
    p2 = torch.nn.functional.max_pool2d(p1, 5, 1, 2)
    assert torch.allclose(crp(x), r + p1 + p2)
