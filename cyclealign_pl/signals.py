"""Ctrl-C as a request to stop cleanly, next to Lightning's own SIGTERM flag.

Lightning's trainer already turns SIGTERM into a flag (``trainer.received_sigterm``); SIGINT it leaves to
Python, whose ``KeyboardInterrupt`` can land anywhere (inside a judge call, half-way through an optimizer
step). :class:`StopRequest` makes the first Ctrl-C a flag as well: the cycle finishes its current iteration,
the module writes a checkpoint and raises ``RunStopped``. A second Ctrl-C raises ``KeyboardInterrupt``.
"""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType
from typing import Any

log = logging.getLogger(__name__)


class StopRequest:
    """Installs a SIGINT handler (main thread only) that records the request instead of interrupting."""

    def __init__(self) -> None:
        self.reason: str | None = None
        self._previous: Any = None
        self._installed = False

    def install(self) -> None:
        if self._installed or threading.current_thread() is not threading.main_thread():
            return
        self._previous = signal.getsignal(signal.SIGINT)
        if self._previous == signal.SIG_IGN:  # ignored on purpose (e.g. a background job): leave it so
            return
        signal.signal(signal.SIGINT, self._handle)
        self._installed = True

    def uninstall(self) -> None:
        if not self._installed or threading.current_thread() is not threading.main_thread():
            return
        previous = self._previous if self._previous is not None else signal.default_int_handler
        signal.signal(signal.SIGINT, previous)
        self._installed = False

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.reason is not None:
            raise KeyboardInterrupt
        self.reason = "received SIGINT (Ctrl-C)"
        log.warning("SIGINT: stopping after the current iteration with a checkpoint; Ctrl-C again aborts")


__all__ = ["StopRequest"]
