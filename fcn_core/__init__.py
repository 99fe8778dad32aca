"""fcn_core: the FCN model, surgery, metrics and transforms. Pure torch + numpy."""

from fcn_core.fcn import FCN, FCNConfig, build, fcn8s, fcn8s_atonce, fcn16s, fcn32s
from fcn_core.losses import multi_head_loss, segmentation_loss
from fcn_core.metrics import ConfusionMatrix
from fcn_core.surgery import convolutionalize, promote, transplant_vgg16, upsample_filt

__all__ = [
    "FCN", "FCNConfig", "build", "fcn32s", "fcn16s", "fcn8s", "fcn8s_atonce",
    "ConfusionMatrix", "segmentation_loss", "multi_head_loss",
    "convolutionalize", "transplant_vgg16", "promote", "upsample_filt",
]
