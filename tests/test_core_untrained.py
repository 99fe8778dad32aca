"""A net whose score layers are still zero predicts class 0 everywhere: validation of it (the
initial validation of a stage from VGG16 weights) skips the forward pass, with the same
confusion matrices as the pass would give."""

from __future__ import annotations

import pytest
import torch

from fcn_core.fcn import LateFusion, scores_untrained
from fcn_core.models import build_model
from pipelines.train.step import validate

TINY = {"num_classes": 5, "width": 0.0625}
NETS = ["fcn32s", "fcn16s", "fcn8s", "fcn8s_atonce", "fcn32s_alexnet"]


def _net(name: str, heads: dict[str, int] | None = None) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(name, **TINY, heads=heads).eval()


def _batches(n: int, heads: list[str], classes: int = 5):
    g = torch.Generator().manual_seed(1)
    keys = ("label", "label_geo")
    for _ in range(n):
        x = torch.randn(2, 3, 40, 48, generator=g)
        labels = {}
        for k in keys[:len(heads)]:
            y = torch.randint(0, classes, (2, 40, 48), generator=g)
            y[:, :, -5:] = 255  # padding: never counted
            labels[k] = y
        yield x, labels


def _with_forward(model: torch.nn.Module, heads: list[str]) -> dict[str, torch.Tensor]:
    """The confusion matrices the forward pass gives, computed without validate()."""
    from fcn_core.metrics import ConfusionMatrix

    keys = dict(zip(heads, ("label", "label_geo"), strict=False))
    cms = {h: ConfusionMatrix(5) for h in heads}
    with torch.no_grad():
        for x, labels in _batches(3, heads):
            out = model(x)
            out = out if isinstance(out, dict) else {heads[0]: out}
            for h, s in out.items():
                assert torch.count_nonzero(s) == 0  # exactly zero, not merely small
                cms[h].update(labels[keys[h]], s.argmax(1))
    return {h: torch.as_tensor(cm.hist) for h, cm in cms.items()}


def _forbid_forward(model: torch.nn.Module) -> None:
    def hook(*_):
        raise AssertionError("validate ran a forward pass")
    model.register_forward_pre_hook(hook)


@pytest.mark.parametrize("name", NETS)
def test_an_untrained_net_is_scored_without_a_forward_pass_and_the_same(name: str):
    model = _net(name)
    assert scores_untrained(model)
    expected = _with_forward(model, ["out"])
    _forbid_forward(model)
    cms = validate(model, _batches(3, ["out"]), {"out": 5}, ["out"])
    assert torch.equal(torch.as_tensor(cms["out"].hist), expected["out"])
    # Every valid pixel counted once, all of them in column 0.
    assert cms["out"].hist.sum() == 3 * 2 * 40 * 43 == cms["out"].hist[:, 0].sum()


def test_two_heads_and_late_fusion_untrained_are_scored_the_same():
    heads = {"sem": 5, "geo": 5}
    model = _net("fcn8s", heads)
    assert scores_untrained(model)
    expected = _with_forward(model, ["sem", "geo"])
    _forbid_forward(model)
    cms = validate(model, _batches(3, ["sem", "geo"]), heads, ["sem", "geo"])
    for h in heads:
        assert torch.equal(torch.as_tensor(cms[h].hist), expected[h])

    fused = LateFusion(_net("fcn32s"), _net("fcn32s"))
    assert scores_untrained(fused)
    torch.nn.init.constant_(fused.hha.heads.out.score_fr.bias, 0.1)
    assert not scores_untrained(fused)


@pytest.mark.parametrize(("name", "layer", "part"), [
    ("fcn32s", "score_fr", "weight"), ("fcn32s", "score_fr", "bias"),
    ("fcn16s", "score_pool4", "weight"), ("fcn8s", "score_pool3", "bias"),
    ("fcn8s_atonce", "score_pool3", "weight"), ("fcn32s_alexnet", "score_fr", "weight"),
])
def test_one_nonzero_score_weight_means_a_real_forward_pass(name: str, layer: str, part: str):
    model = _net(name)
    with torch.no_grad():
        getattr(getattr(model.heads.out, layer), part).view(-1)[0] = 0.5
    assert not scores_untrained(model)
    calls = []
    model.register_forward_pre_hook(lambda *_: calls.append(1))
    validate(model, _batches(2, ["out"]), {"out": 5}, ["out"])
    assert calls == [1, 1]


def test_other_nets_are_never_taken_for_untrained():
    # A successor's classifier is not zero-initialised: its predictions need the pass.
    assert not scores_untrained(build_model("unet", num_classes=5, width=0.0625))
    assert not scores_untrained(torch.nn.Conv2d(3, 5, 1))
