"""Collecting every rank's per-sample norms on all ranks under ``torch.distributed``.

Under ``DPDDP`` each rank clips only its own samples, so a logged step's norms are spread
over the ranks, with a different and possibly zero count on each. :func:`all_gather_rows`
gathers them in two collectives: the counts first, then the rows padded to the longest.
Every rank must call it at every logged step, also with an empty or missing batch, or the
other ranks wait forever.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist


def process_rank() -> int:
    """Return this process's rank in the default process group, or 0 without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return 0


def _collective_device() -> torch.device:
    # NCCL moves only CUDA tensors, while gloo takes CPU tensors.
    # NOTE: only gloo is tested. The NCCL branch has never run.
    backend = str(dist.get_backend())
    if backend == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_gather_rows(rows: np.ndarray | None, width: int) -> np.ndarray | None:
    """Concatenate every rank's rows in rank order, on every rank.

    Args:
        rows: This rank's float64 rows, shape ``(samples, width)``, or None when this rank
            has no norms for the step.
        width: Number of columns; must be the same on every rank that passes rows.

    Returns:
        All ranks' rows in rank order, or None on every rank if any rank passed None.

    Raises:
        ValueError: On every rank, if the ranks passed different widths.
    """
    device = _collective_device()
    world_size = dist.get_world_size()
    count = -1 if rows is None else len(rows)

    header = torch.tensor([count, width], dtype=torch.int64, device=device)
    headers = [torch.empty_like(header) for _ in range(world_size)]
    dist.all_gather(headers, header)
    counts = [int(h[0]) for h in headers]
    widths = [int(h[1]) for h in headers]

    # Every rank decides from the same gathered headers, so all of them return or raise
    # here, or all of them enter the second collective.
    if min(counts) < 0:
        return None
    if len(set(widths)) > 1:
        raise ValueError(
            f"the ranks logged different numbers of norm columns per sample ({widths}, in "
            "rank order); attach the callback with the same options and the same model on "
            "every rank"
        )
    longest = max(counts)
    if longest == 0 or width == 0:
        return np.zeros((sum(counts), width))

    padded = torch.zeros((longest, width), dtype=torch.float64, device=device)
    if count > 0:
        padded[:count] = torch.from_numpy(rows).to(device)
    gathered = [torch.empty_like(padded) for _ in range(world_size)]
    dist.all_gather(gathered, padded)
    return np.concatenate([g[:n].cpu().numpy() for g, n in zip(gathered, counts)])
