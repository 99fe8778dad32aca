"""The segmentation nets that followed FCN (issue 15), one file each; ``fcn_core.models`` is
their table: ``unet``, ``segnet``, ``deeplab`` (DeepLab-LargeFOV), ``pspnet``, and
torchvision's own builders where it has the net (``torchvision_nets``)."""
