"""Opening, replacing and closing the ``SummaryWriter`` that a callback creates itself."""

from __future__ import annotations

import logging

from torch.utils.tensorboard import SummaryWriter

logger = logging.getLogger(__name__)


def open_writer(log_dir: str) -> SummaryWriter:
    """Create a ``SummaryWriter`` on ``log_dir``, creating the directory if needed.

    Raises:
        OSError: If the directory or the event file cannot be created. The message
            names ``log_dir``.
    """
    try:
        return SummaryWriter(log_dir=log_dir)
    except OSError as error:
        reason = error.strerror or str(error)
        raise OSError(
            error.errno,
            f"failed to create the TensorBoard log directory {log_dir!r}: {reason}. Pass a "
            "directory that can be created and written to, or a SummaryWriter",
        ) from error


def close_writer(writer: SummaryWriter) -> None:
    """Close ``writer``, logging an error instead of raising it."""
    try:
        writer.close()
    except Exception:  # noqa: BLE001 - runs from close(), garbage collection and exit
        logger.exception("failed to close the TensorBoard writer of %s", writer.log_dir)


def reopen_writer(writer: SummaryWriter) -> SummaryWriter | None:
    """Open a new ``SummaryWriter`` on the log directory of ``writer``.

    A ``SummaryWriter`` whose background thread failed to write (torch 2.13, tensorboard
    2.21) raises that error again on every later call, so only a new writer can write
    again. The new one starts a new event file, which TensorBoard reads together with
    the old ones. The caller closes the old writer.

    Returns:
        The new writer, or ``None`` if it could not be created. That error is logged.
    """
    try:
        return open_writer(writer.log_dir)
    except OSError:
        logger.exception("failed to open a new TensorBoard writer in %s", writer.log_dir)
        return None
