"""HHA from depth (Gupta, Girshick, Arbelaez, Malik, ECCV 2014): horizontal disparity, height
above the lowest point, and the angle of the surface normal with gravity, as uint8 channels.

A numpy port of the public MATLAB code (s-gupta/rcnn-depth ``rgbdutils``, as packaged by
charlesCXK/Depth2HHA ``saveHHA.m`` -> ``processDepthImage.m``): the point cloud from the
camera matrix (``getPointCloudFromZ``), normals by a least-squares plane fit over square
windows (``computeNormalsSquareSupport``, 3 and 10 pixel radius), gravity as the direction the
most floor-like normals share and the most wall-like ones are orthogonal to (``getYDir``:
5 + 5 iterations at 45 and 15 degrees), then

    channel 0  disparity = 31000 / depth in cm, depth clamped at >= 100 cm
    channel 1  height = -(y of the gravity-aligned cloud) - its minimum, in cm
    channel 2  angle = acos(normal . gravity) in degrees + 128 - 90

each rounded and saturated to 0..255 as MATLAB's ``uint8`` does, in the channel order the
reference HHA PNGs have (``imwrite`` of ``cat(3, disparity, height, angle)``).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

# NYU Depth v2 colour camera (rcnn-depth getCameraParam('color')), for 640x480 frames.
NYU_INTRINSICS = (518.85790117450188, 519.46961112127485, 325.58244941119034,
                  253.73616633400465)  # fx, fy, cx, cy
NORMAL_RADII = (3, 10)  # processDepthImage: normalParam.patchSize
GRAVITY_STEPS = ((45.0, 5), (15.0, 5))  # getYDir: (angle threshold, iterations)


def camera_matrix(offset: tuple[int, int] = (0, 0),
                  intrinsics: tuple[float, float, float, float] = NYU_INTRINSICS) -> np.ndarray:
    """3x3 camera matrix of a frame cropped at ``offset`` = (rows, cols) from the full
    640x480 frame: the principal point moves by the crop. The FCN / Depth2HHA frames
    (425x560) were encoded with the full-frame matrix, offset (0, 0) (see tests/test_hha.py)."""
    fx, fy, cx, cy = intrinsics
    return np.array([[fx, 0.0, cx - offset[1]], [0.0, fy, cy - offset[0]], [0.0, 0.0, 1.0]])


def _point_cloud(z: np.ndarray, camera: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """X, Y (H, W) for depth z, pixel coordinates 1-based as MATLAB's meshgrid(1:W, 1:H)."""
    h, w = z.shape
    xx, yy = np.meshgrid(np.arange(1, w + 1, dtype=np.float64),
                         np.arange(1, h + 1, dtype=np.float64))
    x = (xx - camera[0, 2]) * z / camera[0, 0]
    y = (yy - camera[1, 2]) * z / camera[1, 1]
    return x, y


def _box_sum(f: np.ndarray, r: int) -> np.ndarray:
    """filter2(ones(2r+1), f) per channel: zero padding, 'same' size. f (H, W, C)."""
    k = 2 * r + 1
    return ndimage.uniform_filter(f, size=(k, k, 1), mode="constant", cval=0.0) * (k * k)


def normals(z_cm: np.ndarray, missing: np.ndarray, radius: int, camera: np.ndarray
            ) -> np.ndarray:
    """Unit normals (H, W, 3) of planes fit over (2r+1)^2 windows, pointing to the camera
    (computeNormalsSquareSupport with one superpixel); NaN where no plane fits."""
    x, y = _point_cloud(z_cm, camera)
    xf, yf, zf = x, y, z_cm
    with np.errstate(divide="ignore", invalid="ignore"):
        X, Y, Z = (np.where(missing, np.nan, a) for a in (x, y, z_cm))
        one_z, x_z, y_z = 1 / Z, X / Z, Y / Z
        one = np.where(np.isnan(Z), np.nan, 1.0)
        x_zz, y_zz = X / (Z * Z), Y / (Z * Z)
    raw = np.stack([x_z ** 2, x_z * y_z, x_z, y_z ** 2, y_z, one, x_zz, y_zz, one_z], axis=-1)
    s = _box_sum(np.nan_to_num(raw, nan=0.0), radius)
    a = [s[..., k] for k in range(6)]  # AtA, symmetric: a1 a2 a3 / a4 a5 / a6
    b = [s[..., 6 + k] for k in range(3)]
    A = a[3] * a[5] - a[4] * a[4]
    D = -(a[1] * a[5] - a[2] * a[4])
    G = a[1] * a[4] - a[2] * a[3]
    E = a[0] * a[5] - a[2] * a[2]
    H = -(a[0] * a[4] - a[1] * a[2])
    K = a[0] * a[3] - a[1] * a[1]
    n = np.stack([A * b[0] + D * b[1] + G * b[2],  # adjugate(AtA) @ Atb (det dropped:
                  D * b[0] + E * b[1] + H * b[2],  # the normal is normalised below)
                  G * b[0] + H * b[1] + K * b[2]], axis=-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        n = n / np.linalg.norm(n, axis=-1, keepdims=True)
    sn = np.sign(n[..., 2])
    sn[sn == 0] = 1
    n = n * sn[..., None]
    sn = np.sign(np.sum(n * np.stack([xf, yf, zf], -1), axis=-1))
    sn[np.isnan(sn) | (sn == 0)] = 1
    return n * sn[..., None]


def gravity(n: np.ndarray) -> np.ndarray:
    """The gravity direction (3,) from normals (H, W, 3): getYDir, starting from y = (0, 1, 0)."""
    nn = n.reshape(-1, 3)
    nn = nn[~np.isnan(nn[:, 0])].T  # (3, M)
    y = np.array([0.0, 1.0, 0.0])
    for thresh, iters in GRAVITY_STEPS:
        for _ in range(iters):
            sim = y @ nn
            floor = nn[:, np.abs(sim) > np.cos(np.radians(thresh))]
            wall = nn[:, np.abs(sim) < np.sin(np.radians(thresh))]
            vals, vecs = np.linalg.eigh(wall @ wall.T - floor @ floor.T)
            new = vecs[:, np.argmin(vals)]
            y = new * (np.sign(y @ new) or 1.0)
    return y


def _rotation(yi: np.ndarray, yf: np.ndarray) -> np.ndarray:
    """getRMatrix: the rotation taking yi to yf (identity below 0.1 degree)."""
    yi, yf = yi / np.linalg.norm(yi), yf / np.linalg.norm(yf)
    ax = np.cross(yi, yf)
    phi = np.degrees(np.arccos(np.clip(yi @ yf, -1.0, 1.0)))
    if abs(phi) <= 0.1:
        return np.eye(3)
    ax = ax / np.linalg.norm(ax)
    s = np.array([[0, -ax[2], ax[1]], [ax[2], 0, -ax[0]], [-ax[1], ax[0], 0]])
    p = np.radians(phi)
    return np.eye(3) + np.sin(p) * s + (1 - np.cos(p)) * (s @ s)


def _uint8(x: np.ndarray) -> np.ndarray:
    """MATLAB's uint8(): round half away from zero, saturate, NaN -> 0."""
    x = np.nan_to_num(x, nan=0.0)
    return np.clip(np.sign(x) * np.floor(np.abs(x) + 0.5), 0, 255).astype(np.uint8)


def depth_to_hha(depth_mm: np.ndarray, *, raw_mm: np.ndarray | None = None,
                 camera: np.ndarray | None = None) -> np.ndarray:
    """uint8 HHA (H, W, 3) of a depth map in millimetres (H, W).

    ``raw_mm``: the raw sensor depth whose zeros mark missing pixels (saveHHA's RD); without
    it the zeros of ``depth_mm`` do. ``camera``: 3x3 matrix (default: NYU's colour camera,
    ``camera_matrix()``)."""
    d = np.asarray(depth_mm)
    if d.ndim != 2 or d.dtype.kind not in "uif":
        raise ValueError(f"depth_mm must be a 2-D numeric map (H, W), got {d.dtype} {d.shape}")
    raw = d if raw_mm is None else np.asarray(raw_mm)
    if raw.shape != d.shape:
        raise ValueError(f"raw_mm must have the shape of depth_mm {d.shape}, got {raw.shape}")
    missing = raw == 0
    if missing.all():
        raise ValueError("depth_mm has no valid pixel (every value is 0)")
    c = camera_matrix() if camera is None else np.asarray(camera, np.float64)
    z = d.astype(np.float64) / 10.0  # cm (saveHHA: D / 1000 * 100)
    n_fine = normals(z, missing, NORMAL_RADII[0], c)  # for the angle
    y_dir = gravity(normals(z, missing, NORMAL_RADII[1], c))
    r = _rotation(np.array([0.0, 1.0, 0.0]), y_dir)
    x, y = _point_cloud(z, c)
    y_rot = (r.T @ np.stack([x, y, z]).reshape(3, -1))[1].reshape(z.shape)  # rotatePC(pc, R')
    height = -y_rot
    lowest = height.min()
    height = height - (lowest if lowest <= -90 else -130.0)
    with np.errstate(invalid="ignore"):
        angle = np.degrees(np.arccos(np.clip(n_fine @ y_dir, -1.0, 1.0)))
    disparity = 31000.0 / np.maximum(z, 100.0)
    return np.stack([_uint8(disparity), _uint8(height), _uint8(angle + 128 - 90)], axis=-1)
