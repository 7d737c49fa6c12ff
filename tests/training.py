"""Training loops and comparisons shared by the tests that run Opacus end to end."""

from __future__ import annotations

from typing import Callable

import torch

from conftest import Private

Corrupt = Callable[[int, torch.Tensor], torch.Tensor]


def train_step(private: Private, x: torch.Tensor, y: torch.Tensor) -> None:
    """Run one forward pass, backward pass and optimizer step on one batch."""
    private.optimizer.zero_grad()
    private.criterion(private.model(x), y).backward()
    private.optimizer.step()


def train_epochs(private: Private, epochs: int = 1) -> None:
    """Run ``epochs`` passes over the private loader."""
    for _ in range(epochs):
        for x, y in private.loader:
            train_step(private, x, y)


def train(private: Private, steps: int, *, corrupt: Corrupt | None = None) -> None:
    """Run ``steps`` optimizer steps over the private loader, epoch after epoch.

    ``corrupt(step, x)`` may replace a batch's inputs before the forward pass.
    """
    done = 0
    while done < steps:
        for x, y in private.loader:
            if corrupt is not None:
                x = corrupt(done, x)
            train_step(private, x, y)
            done += 1
            if done == steps:
                return


def parameters(private: Private) -> list[torch.Tensor]:
    return [p.detach().clone() for p in private.model.parameters()]


def assert_bitwise_equal(left: list[torch.Tensor], right: list[torch.Tensor]) -> None:
    assert len(left) == len(right)
    for a, b in zip(left, right):
        assert torch.equal(a, b)
