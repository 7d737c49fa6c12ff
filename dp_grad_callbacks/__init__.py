"""TensorBoard diagnostics of the per-sample gradient norms that Opacus clips in DP-SGD."""

from .callback import GradNormCallback, MissingPerSampleGradientsError
from .record import GradNormRecord

__all__ = ["GradNormCallback", "GradNormRecord", "MissingPerSampleGradientsError"]
__version__ = "0.1.0"
