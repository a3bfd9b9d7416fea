"""`cls_saliency`: Golub et al. (seed 002): proxy labels (`proxy_labels`), guided-backprop or CAM saliency
(`saliency`), the 5-channel class-agnostic segmenter and GrabCut (`method`)."""

from ovseg.core.methods.cls_saliency.method import ClsSaliency  # noqa: F401
