"""The record of one logged step."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class GradNormRecord:
    """Per-sample gradient norms of one logical optimizer step.

    Attributes:
        step: 0-based count of logical steps (``optimizer.step()`` calls that Opacus did
            not skip) since the callback was created.
        before: Per-sample norms before clipping, one float per sample, in batch order.
        after: The same norms after clipping, ``before * min(1, C / (before + 1e-6))``.
        max_grad_norm: The clipping bound C that clipped this step.
        synthetic: True when the norms were drawn from the log-normal generator instead
            of read from Opacus.
    """

    step: int
    before: np.ndarray
    after: np.ndarray
    max_grad_norm: float
    synthetic: bool = False

    @property
    def num_samples(self) -> int:
        """Number of samples in the step."""
        return int(self.before.size)
