"""Ctrl-C as a request to stop cleanly, next to Lightning's own SIGTERM flag, and a deadline for acting on
either.

Lightning's trainer already turns SIGTERM into a flag (``trainer.received_sigterm``); SIGINT it leaves to
Python, whose ``KeyboardInterrupt`` can land anywhere (inside a judge call, half-way through an optimizer
step). :class:`StopRequest` makes the first Ctrl-C a flag as well: the cycle finishes its current iteration,
the module writes a checkpoint and raises ``RunStopped``. A second Ctrl-C raises ``KeyboardInterrupt``.

A flag only works if the process gets back to where it is read. Python runs signal handlers between
bytecodes of the main thread, so a process blocked in a collective whose peer hung or died never even sets
it. :class:`StopDeadline` watches for the signals from a thread of its own and ends the process when the
run has not stopped within its grace period.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from types import FrameType
from typing import Any

log = logging.getLogger(__name__)

EXIT_STOPPED = (
    3  # the process's status after a deliberate stop (signal, judge budget): what could be saved was
)


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


class StopDeadline:
    """Ends the process (status ``exit_status``) when a run has not stopped ``grace_s`` seconds after a
    SIGTERM or SIGINT, keeping the checkpoints already saved.

    The C-level part of Python's signal handling writes each signal's number to the wakeup fd even while the
    main thread is blocked (in a collective, a C call); a watcher thread reads it there and starts the clock.
    :meth:`disarm` (the run ended, stopped or not) stops the watch and restores the previous wakeup fd, to
    which every byte read is passed on meanwhile. Main thread only (elsewhere it does nothing).
    """

    WATCHED = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, grace_s: float, exit_status: int, message: str) -> None:
        self.grace_s = grace_s
        self.exit_status = exit_status
        self.message = message
        self._fds: tuple[int, int] | None = None
        self._previous_fd = -1
        self._timer: threading.Timer | None = None
        self._lock = threading.Lock()

    def arm(self) -> None:
        if self._fds is not None or threading.current_thread() is not threading.main_thread():
            return
        read_fd, write_fd = os.pipe()
        os.set_blocking(write_fd, False)
        try:
            self._previous_fd = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
        except ValueError:  # not the main interpreter
            os.close(read_fd)
            os.close(write_fd)
            return
        self._fds = (read_fd, write_fd)
        threading.Thread(target=self._watch, args=(read_fd,), name="StopDeadline", daemon=True).start()

    def disarm(self) -> None:
        if self._fds is None or threading.current_thread() is not threading.main_thread():
            return
        write_fd = self._fds[1]
        self._fds = None
        signal.set_wakeup_fd(self._previous_fd)
        with self._lock:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
        os.close(write_fd)  # the watcher's read returns b"": it closes the read end

    def _watch(self, read_fd: int) -> None:
        previous = self._previous_fd
        while data := os.read(read_fd, 64):
            if previous >= 0:
                try:
                    os.write(previous, data)
                except OSError:
                    previous = -1
            if any(signum in data for signum in self.WATCHED):
                self._start_clock()
        os.close(read_fd)

    def _start_clock(self) -> None:
        with self._lock:
            if self._timer is None and self._fds is not None:
                self._timer = threading.Timer(self.grace_s, self._expire)
                self._timer.daemon = True
                self._timer.start()

    def _expire(self) -> None:
        print(self.message.format(grace_s=self.grace_s), file=sys.stderr, flush=True)
        logging.shutdown()
        os._exit(self.exit_status)


def sigterm_as_a_flag_only(trainer: Any) -> None:
    """Under data parallelism, replace Lightning's SIGTERM handler (2.6) by one that only sets its flag.

    Lightning's handler broadcasts the flag to the other processes from inside the handler, at whatever point
    the main thread was: a collective that may pair with another process's round collectives and put them
    out of step. The stop decision is reduced over the processes anyway (``CycleAlignModule._stop_reason``,
    and Lightning's own broadcast at each batch start). Like Lightning's, the handler passes the signal on to
    the processes its launcher started. Lightning restores the previous handlers at the end of ``fit``.
    """
    if trainer.world_size < 2 or threading.current_thread() is not threading.main_thread():
        return
    connector = trainer._signal_connector

    def flag(signum: int, frame: FrameType | None) -> None:
        if not connector.received_sigterm:
            log.warning("SIGTERM: stopping after the current round with a checkpoint")
            launcher = trainer.strategy.launcher
            if launcher is not None:
                launcher.kill(signum)
        connector.received_sigterm = True

    signal.signal(signal.SIGTERM, flag)


STOP_DEADLINE_MESSAGE = (
    "cyclealign_pl: a stop signal came {grace_s:g} s ago and the run has not stopped (blocked, e.g. in a "
    "collective with a process that hung or died; or slower than model.stop_grace_s): exiting without a new "
    "checkpoint; resume from the last one with --ckpt_path last"
)


class FitSignals:
    """What a fit stops on: SIGTERM (Lightning's flag) and Ctrl-C as flags read between iterations, and the
    deadline past which a stop that was not acted on ends the process (``grace_s``; None: no deadline)."""

    def __init__(self, grace_s: float | None) -> None:
        self.request = StopRequest()
        self.deadline = StopDeadline(grace_s, EXIT_STOPPED, STOP_DEADLINE_MESSAGE) if grace_s else None

    def install(self, trainer: Any) -> None:
        self.request.install()
        sigterm_as_a_flag_only(trainer)  # no collective inside a signal handler (DDP)
        if self.deadline is not None:
            self.deadline.arm()

    def uninstall(self, disarm: bool = True) -> None:
        """Give Ctrl-C back; ``disarm``: also stop the deadline's watch (at teardown, after any export)."""
        self.request.uninstall()
        if disarm and self.deadline is not None:
            self.deadline.disarm()

    def reason(self, trainer: Any) -> str | None:
        """This process's reason to stop, if it has one."""
        return "received SIGTERM" if trainer.received_sigterm else self.request.reason


__all__ = ["FitSignals", "StopDeadline", "StopRequest", "sigterm_as_a_flag_only"]
