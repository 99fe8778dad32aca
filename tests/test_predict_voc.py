"""fcn predict --format voc: the PASCAL VOC evaluation server's layout and tarball."""

import tarfile

import numpy as np
import pytest
from PIL import Image

from fcn_core.fcn import fcn32s
from fcn_core.palettes import voc_colormap
from flows.cli import main
from pipelines.config import StageConfig, TrainConfig
from pipelines.errors import UsageError
from pipelines.predict import VOC_RESULTS, predict
from pipelines.train.checkpoint import write_checkpoint

IDS = ("2008_000001", "2008_000002", "2010_000003")


def _model(tmp_path, classes=21, dataset="voc"):
    import torch

    torch.manual_seed(0)
    net = fcn32s(num_classes=classes, width=1 / 16)
    for name, p in net.named_parameters():  # varied predictions, not all background
        if "score_fr" in name:
            p.data.normal_(0, 1.0)
    cfg = TrainConfig(name="p", dataset=dataset, width=1 / 16, workers=1,
                      stages=(StageConfig("32s", 1, 0.1),))
    return write_checkpoint(tmp_path / f"m{classes}.pt", net, config=cfg.to_dict())


@pytest.fixture
def images(tmp_path):
    rng = np.random.default_rng(0)
    folder = tmp_path / "images"
    folder.mkdir()
    for i, id_ in enumerate(IDS):
        a = rng.integers(0, 255, (40 + 4 * i, 48, 3), dtype=np.uint8)
        Image.fromarray(a).save(folder / f"{id_}.jpg", quality=95)
    return folder


@pytest.mark.parametrize("ray_threshold", [64, 2], ids=["in-process", "ray-data"])
def test_voc_format_writes_the_server_layout_and_tarball(tmp_path, images, ray_threshold,
                                                         request):
    if ray_threshold < len(IDS):
        request.getfixturevalue("ray_local")
    model = _model(tmp_path)
    predict(model, [str(images)], str(tmp_path / "plain"), log=lambda m: None)
    res = predict(model, [str(images)], str(tmp_path / "out"), fmt="voc",
                  ray_threshold=ray_threshold, actors=1 if ray_threshold < len(IDS) else None,
                  log=lambda m: None)
    folder = tmp_path / "out" / VOC_RESULTS
    assert sorted(p.name for p in folder.iterdir()) == [f"{i}.png" for i in IDS]
    assert len(res.written) == 3 and not res.skipped
    assert not list((tmp_path / "out").glob("*_color.png"))
    palette = voc_colormap(256).astype(np.uint8).ravel().tolist()
    for id_ in IDS:
        with Image.open(folder / f"{id_}.png") as im:
            assert im.mode == "P" and im.getpalette()[:768] == palette
            got = np.array(im)
        with Image.open(tmp_path / "plain" / f"{id_}.png") as im:
            want = np.array(im)
        assert np.array_equal(got, want) and got.max() <= 20
    values = np.unique(np.concatenate([np.array(Image.open(folder / f"{i}.png")).ravel()
                                       for i in IDS]))
    assert len(values) > 1  # a real prediction, not a blank image
    with tarfile.open(tmp_path / "out" / "results.tgz") as tar:
        names = tar.getnames()
        assert names == [f"{VOC_RESULTS}/{i}.png" for i in IDS]
        for name in names:
            assert tar.extractfile(name).read() == (tmp_path / "out" / name).read_bytes()
    assert str(tmp_path / "out" / "results.tgz") in res.summary(str(tmp_path / "out"))
    # the same predictions give the same tarball bytes
    again = predict(model, [str(images)], str(tmp_path / "again"), fmt="voc",
                    log=lambda m: None)
    assert (tmp_path / "again" / "results.tgz").read_bytes() == \
        (tmp_path / "out" / "results.tgz").read_bytes()
    assert again.tarball.endswith("results.tgz")


def test_voc_format_refuses_other_models_and_duplicate_ids(tmp_path, images, capsys):
    nyud = _model(tmp_path, classes=40, dataset="nyud")
    with pytest.raises(UsageError, match="needs a model over the 21 PASCAL VOC classes"):
        predict(nyud, [str(images)], str(tmp_path / "o"), fmt="voc", log=lambda m: None)
    other = tmp_path / "more"
    other.mkdir()
    Image.open(images / f"{IDS[0]}.jpg").save(other / f"{IDS[0]}.png")  # same id, other file
    model = _model(tmp_path)
    code = main(["predict", "--model", model, "--format", "voc", "--out",
                 str(tmp_path / "o"), str(images), str(other)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert f"share the id '{IDS[0]}'" in err[0]
    assert not (tmp_path / "o" / "results.tgz").exists()
