"""TensorBoard diagnostics of the per-sample gradient norms that Opacus clips in DP-SGD."""

from .callback import GradNormCallback, MissingPerSampleGradientsError
from .capture import UnsupportedModeError
from .record import GradNormRecord

__all__ = [
    "GradNormCallback",
    "GradNormRecord",
    "MissingPerSampleGradientsError",
    "UnsupportedModeError",
]
__version__ = "0.1.0"
