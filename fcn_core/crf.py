"""Fully connected CRF post-processing (DeepLab; Krähenbühl & Koltun, NIPS 2011).

Mean-field inference of a dense CRF whose unary is the net's -log probability and whose
pairwise terms are a Gaussian spatial kernel (smoothness) and a bilateral kernel on position
and colour (appearance), with Potts compatibility. It runs Krähenbühl's permutohedral-lattice
code through ``pydensecrf2`` (the ``crf`` extra; it builds from source with a C++ compiler,
59 s on the 2-core test machine), exactly the filtering DeepLab used, on the CPU. The defaults
are DeepLab-LargeFOV's cross-validated ones: 10 iterations, bilateral weight 4 with 121 px and
5 colour levels, Gaussian weight 3 with 3 px.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

INSTALL_HINT = ("the dense CRF needs pydensecrf2 (the project's 'crf' extra, built with a C++ "
                "compiler): pip install -c constraints.txt '.[crf]'")


@dataclass(frozen=True)
class CRFParams:
    """The dense CRF's parameters (DeepLab-LargeFOV's by default)."""

    iterations: int = 10
    bilateral_weight: float = 4.0  # w1
    bilateral_xy: float = 121.0  # theta_alpha, pixels
    bilateral_rgb: float = 5.0  # theta_beta, colour levels
    gaussian_weight: float = 3.0  # w2
    gaussian_xy: float = 3.0  # theta_gamma, pixels

    def __post_init__(self) -> None:
        if isinstance(self.iterations, bool) or not isinstance(self.iterations, int) \
                or self.iterations < 1:
            raise ValueError(f"iterations must be an int >= 1, got iterations="
                             f"{self.iterations!r}")
        for name in ("bilateral_weight", "gaussian_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {name}={getattr(self, name)}")
        for name in ("bilateral_xy", "bilateral_rgb", "gaussian_xy"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {name}={getattr(self, name)}")


def available() -> bool:
    """Whether pydensecrf2 is installed (``dense_crf`` raises ImportError without it)."""
    try:
        import pydensecrf.densecrf  # noqa: F401
    except ImportError:
        return False
    return True


def dense_crf(probs: np.ndarray, image: np.ndarray, params: CRFParams = CRFParams()
              ) -> np.ndarray:
    """Class probabilities (K, H, W) of the net and the uint8 RGB image (H, W, 3) it scored
    -> the CRF's marginals (K, H, W), float32, summing to 1 per pixel."""
    try:
        import pydensecrf.densecrf as dcrf
    except ImportError as e:
        raise ImportError(INSTALL_HINT) from e
    if probs.ndim != 3:
        raise ValueError(f"probs must be (K, H, W), got shape {probs.shape}")
    k, h, w = probs.shape
    if image.shape != (h, w, 3) or image.dtype != np.uint8:
        raise ValueError(f"image must be uint8 ({h}, {w}, 3) like probs, got {image.dtype} "
                         f"{image.shape}")
    unary = -np.log(np.clip(probs.reshape(k, -1), 1e-8, 1.0)).astype(np.float32)
    crf = dcrf.DenseCRF2D(w, h, k)
    crf.setUnaryEnergy(np.ascontiguousarray(unary))
    crf.addPairwiseGaussian(sxy=params.gaussian_xy, compat=params.gaussian_weight)
    crf.addPairwiseBilateral(sxy=params.bilateral_xy, srgb=params.bilateral_rgb,
                             rgbim=np.ascontiguousarray(image), compat=params.bilateral_weight)
    q = np.asarray(crf.inference(params.iterations), dtype=np.float32)
    return q.reshape(k, h, w)
