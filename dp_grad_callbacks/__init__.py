"""TensorBoard diagnostics of the per-sample gradient norms that Opacus clips in DP-SGD."""

from .callback import GradNormCallback, MissingPerSampleGradientsError
from .capture import UnsupportedModeError
from .privacy import EpsilonPreview, RawNormsWarning, preview_epsilon
from .record import GradNormRecord

__all__ = [
    "EpsilonPreview",
    "GradNormCallback",
    "GradNormRecord",
    "MissingPerSampleGradientsError",
    "RawNormsWarning",
    "UnsupportedModeError",
    "preview_epsilon",
]
__version__ = "0.1.0"
