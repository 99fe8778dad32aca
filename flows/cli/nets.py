"""``fcn describe``: an FCN's layers, shapes, crop offsets and cost."""

from __future__ import annotations

import argparse

from flows.cli.common import positive_float, positive_int, size


def cmd_describe(args: argparse.Namespace) -> int:
    import torch

    from fcn_core.models import build_model
    from fcn_core.profile import layer_stats, learned_params
    from pipelines.errors import UsageError

    try:
        model = build_model(args.variant, num_classes=args.classes, width=args.width,
                            in_channels=args.in_channels).eval()
    except ValueError as e:  # what this net cannot be (a width, channels): the user's choice
        raise UsageError(str(e)) from None
    h, w = args.size
    x = torch.zeros(1, args.in_channels, h, w)
    stats = layer_stats(model, x)
    print(f"{args.variant}  width={args.width}  classes={args.classes}  input 1x"
          f"{args.in_channels}x{h}x{w}")
    names = [paper_name(model, s.name) for s in stats]
    n = max([28, *(len(name) + 2 for name in names)])
    k = max([17, *(len(s.kind) + 2 for s in stats)])
    print(f"{'layer':<{n}}{'kind':<{k}}{'output':<22}{'params':>12}{'MMAC':>12}")
    for name, s in zip(names, stats, strict=True):
        print(f"{name:<{n}}{s.kind:<{k}}{str(s.out_shape):<22}{s.params:>12,}"
              f"{s.macs / 1e6:>12.1f}")
    n_params = sum(p.numel() for p in model.parameters())
    n_learned = learned_params(model)
    if hasattr(model, "offsets"):
        print(f"crop offsets: {model.offsets}")
    fixed = n_params - n_learned
    print(f"parameters: {n_learned:,}" + (f" (+ {fixed:,} of fixed bilinear upsampling)"
                                          if fixed else "") + "   "
          f"GMAC per image: {sum(s.macs for s in stats) / 1e9:.2f}")
    return 0


def paper_name(model: object, name: str) -> str:
    """``features.0 (conv1_1)``: a VGG16 FCN's trunk layer with the reference's name beside
    torchvision's index (what its checkpoints and weights use)."""
    from fcn_core.fcn import FCN, LateFusion
    from fcn_core.vgg import VGG16_NAMES

    head, _, index = name.rpartition("features.")
    if isinstance(model, (FCN, LateFusion)) and index.isdigit() and head in ("", *(
            f"{tower}." for tower in ("color", "hha"))) and int(index) in VGG16_NAMES:
        return f"{name} ({VGG16_NAMES[int(index)]})"
    return name


def add_parsers(sub: argparse._SubParsersAction) -> None:
    from fcn_core.models import NAMES, describe_names

    p = sub.add_parser("describe", help="print an FCN's layers, shapes, crop offsets and cost",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Build a net of fcn_core.build_model's table and print every "
                                   "conv, pool and deconvolution with its output shape, "
                                   "parameters and multiply-accumulates for one input size.",
                       epilog="nets:\n" + describe_names())
    p.add_argument("--variant", choices=NAMES, default="fcn8s",
                   help="which net (default: fcn8s; the list below)")
    p.add_argument("--width", type=positive_float, default=1.0,
                   help="channel multiplier of the FCNs' trunk (1.0 = the real net; default "
                        "1.0); torchvision's nets (fcn_resnet50, deeplabv3_*, ...) take 1.0 "
                        "only")
    p.add_argument("--classes", type=positive_int, default=21,
                   help="number of classes (default 21)")
    p.add_argument("--in-channels", type=positive_int, default=3,
                   help="3 = BGR, 4 = RGB-D (default 3)")
    p.add_argument("--size", type=size, default=(500, 500), help="input HxW (default 500x500)")
    p.set_defaults(func=cmd_describe)
