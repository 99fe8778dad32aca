"""fcn_core: the FCN model, surgery, metrics and transforms. Pure torch + numpy.

Names are imported on first use (PEP 562), so ``import fcn_core.palettes`` in a data worker
does not pay for importing torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "FCN": "fcn", "FCNConfig": "fcn", "build": "fcn", "fcn32s": "fcn", "fcn16s": "fcn",
    "fcn8s": "fcn", "fcn8s_atonce": "fcn",
    "ConfusionMatrix": "metrics",
    "segmentation_loss": "losses", "multi_head_loss": "losses",
    "convolutionalize": "surgery", "transplant_vgg16": "surgery", "promote": "surgery",
    "upsample_filt": "surgery", "build_model": "models",
}
__all__ = [  # noqa: F822 - provided lazily by __getattr__
    "FCN", "FCNConfig", "build", "fcn32s", "fcn16s", "fcn8s", "fcn8s_atonce",
    "ConfusionMatrix", "segmentation_loss", "multi_head_loss",
    "convolutionalize", "transplant_vgg16", "promote", "upsample_filt", "build_model",
]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"fcn_core.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'fcn_core' has no attribute {name!r}")


if TYPE_CHECKING:  # for type checkers and IDEs
    from fcn_core.fcn import FCN, FCNConfig, build, fcn8s, fcn8s_atonce, fcn16s, fcn32s
    from fcn_core.losses import multi_head_loss, segmentation_loss
    from fcn_core.metrics import ConfusionMatrix
    from fcn_core.models import build_model
    from fcn_core.surgery import convolutionalize, promote, transplant_vgg16, upsample_filt
