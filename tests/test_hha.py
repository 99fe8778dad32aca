"""HHA from depth against the public Depth2HHA port's output for the real NYUD frame
img_5001, plus the geometry on a synthetic scene and the ingest path (--compute-hha)."""

import time

import numpy as np
import pytest
from PIL import Image

from pipelines.sources.hha import camera_matrix, depth_to_hha, gravity, normals


@pytest.fixture(scope="module")
def pair(realdata):
    src = realdata / "nyud" / "charlesCXK_Depth2HHA"
    load = lambda p: np.array(Image.open(src / p))  # noqa: E731
    return load("depth/img_5001.png"), load("rawdepth/img_5001.png"), load("hha/img_5001.png")


def _agreement(got, ref, valid):
    out = []
    for c in range(3):
        a, b = got[..., c][valid].astype(float), ref[..., c][valid].astype(float)
        out.append((np.abs(a - b).mean(), np.abs(a - b).max(), np.corrcoef(a, b)[0, 1]))
    return out


def test_hha_matches_the_reference_encoding_of_img_5001(pair):
    depth, raw, ref = pair
    t0 = time.perf_counter()
    got = depth_to_hha(depth, raw_mm=raw)
    seconds = time.perf_counter() - t0
    assert got.shape == ref.shape == (425, 560, 3) and got.dtype == np.uint8
    valid = raw > 0
    (d_mae, d_max, _), (h_mae, _, h_corr), (a_mae, _, a_corr) = _agreement(got, ref, valid)
    print(f"\nHHA vs Depth2HHA img_5001 ({seconds:.2f} s): disparity max |diff| {d_max:.0f}; "
          f"height MAE {h_mae:.3f} corr {h_corr:.4f}; angle MAE {a_mae:.3f} corr {a_corr:.4f}")
    assert d_max <= 1  # the bar: within +-1 grey level wherever depth is valid
    assert h_corr >= 0.99 and a_corr >= 0.99 and h_mae < 0.5 and a_mae < 0.5
    # The reference encoded the 425x560 frames with the full-frame NYU matrix: the crop
    # offset that matches is (0, 0); NYU's (45, 41) crop gives a worse height channel.
    shifted = _agreement(depth_to_hha(depth, raw_mm=raw, camera=camera_matrix((45, 41))),
                         ref, valid)
    assert shifted[1][0] > 4 * h_mae
    # Depth alone (no raw map: its zeros mark nothing here) still meets the 0.95 goal.
    alone = _agreement(depth_to_hha(depth), ref, valid)
    assert alone[0][1] <= 1 and alone[1][2] >= 0.95 and alone[2][2] >= 0.95


def test_a_floor_plane_gives_gravity_along_its_normal():
    # A floor 1.5 m below the camera (y down): z = 1.5 * fy / (v - cy), for a crop of the
    # NYU frame starting 300 rows down (every row below the horizon).
    c = camera_matrix((300, 0))
    h, w = 120, 160
    v = np.arange(1, h + 1, dtype=float)[:, None]
    z_m = np.repeat(1.5 * c[1, 1] / (v - c[1, 2]), w, axis=1)
    n = normals(z_m * 100, np.zeros((h, w), bool), 3, c)
    inner = n[5:-5, 5:-5].reshape(-1, 3)
    assert np.allclose(np.abs(inner[:, 1]), 1.0, atol=1e-3)  # floor normals are vertical
    g = gravity(normals(z_m * 100, np.zeros((h, w), bool), 10, c))
    assert abs(abs(g[1]) - 1.0) < 1e-3
    hha = depth_to_hha((z_m * 1000).astype(np.uint16), camera=c)
    angle = hha[5:-5, 5:-5, 2].astype(int)
    assert np.all(np.abs(angle - 38) <= 1)  # 0 degrees (or 180 - ...): 0 + 128 - 90 = 38
    near, far = hha[-1, 80, 0], hha[0, 80, 0]
    assert near > far  # disparity falls with depth


@pytest.mark.parametrize("bad, match", [
    (np.zeros((4, 4, 3), np.uint16), "2-D numeric map"),
    (np.zeros((8, 8), np.uint16), "no valid pixel"),
    (np.array([["a"]]), "2-D numeric map")])
def test_bad_depth_is_refused_in_one_line(bad, match):
    with pytest.raises(ValueError, match=match):
        depth_to_hha(bad)


@pytest.mark.usefixtures("ray_local")
def test_ingest_computes_hha_from_depth(tmp_path, realdata):
    import shutil

    from pipelines.ingest import IngestConfig, ingest
    from pipelines.shards import decode_arrays, read_split_table
    from pipelines.sources import synthetic as synth

    raw = synth.write_nyud(tmp_path / "raw", n_train=2, n_val=1, size=(32, 32))
    shutil.rmtree(raw / "data" / "hha")  # a copy with depth maps only
    r = ingest(IngestConfig(dataset="nyud", root=raw, out=tmp_path, compute_hha=True),
               log=lambda m: None)
    assert r.rows["train"] == 2 and not r.rejected
    for row in read_split_table(tmp_path / "nyud", "train").to_pylist():
        depth = np.array(Image.open(raw / "data" / "depth" / f"img_{row['id']}.png"))
        assert np.array_equal(decode_arrays(row)["hha"], depth_to_hha(depth))
    shutil.rmtree(raw / "data" / "depth")
    from pipelines.errors import UserError
    with pytest.raises(UserError, match="--compute-hha needs the depth maps"):
        ingest(IngestConfig(dataset="nyud", root=raw, out=tmp_path / "b", compute_hha=True),
               log=lambda m: None)
