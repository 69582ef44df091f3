"""What a command shows on the screen, and the run's log file that keeps everything else.

The screen gets the progress bar, the warnings that concern the user's run (their data, settings, judge, their
own code's warnings) and the end-of-run summary. Library chatter - Lightning's device banner, tips and model
summary, deprecation warnings of one library about another, DeepSpeed's accelerator guess, warnings about
situations this package handles itself (a resumed run's non-empty checkpoint directory) - goes only to
``<trainer.default_root_dir>/run.log`` (``run.rank<N>.log`` for other processes), with every other record of
INFO and above. Records logged before the run directory is known are held and written when it is.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from collections.abc import Iterable
from logging.handlers import MemoryHandler
from pathlib import Path
from typing import TextIO

LOG_NAME = "run.log"
# Lines of third-party libraries that the user can do nothing about, or that this package already handles.
NOISE: tuple[str, ...] = (
    "GPU available:",
    "TPU available:",
    "HPU available:",
    "litlogger",
    "LeafSpec",
    "Total FLOPs",
    "Setting accelerator to CPU",  # DeepSpeed, on a machine without GPU (the CLI checks the strategy itself)
    "exists and is not empty",  # Lightning, on resume: one run per directory is enforced (run_dir.py)
    "weights_only",  # torch.load's default, about checkpoints this run wrote itself
)
# Loggers that attach their own stream handlers at import: their records are routed through the root instead.
OWN_HANDLERS: tuple[str, ...] = (
    "lightning",
    "lightning.pytorch",
    "lightning.fabric",
    "pytorch_lightning",
    "lightning_fabric",
)
DEPRECATIONS = (DeprecationWarning, PendingDeprecationWarning, FutureWarning)


def on_screen(record: logging.LogRecord) -> bool:
    """Whether a record is for the user's eyes (all of them go to the run's log file)."""
    if record.levelno >= logging.ERROR:
        return True
    if record.levelno < logging.WARNING:
        return False
    message = record.getMessage()
    if any(pattern in message for pattern in NOISE):
        return False
    category = getattr(record, "category", None)
    if isinstance(category, type) and issubclass(category, DEPRECATIONS):
        return getattr(record, "user_code", False)  # a library's deprecations are not the user's concern
    return True


class _Screen(logging.StreamHandler):
    """A stream handler writing to the *current* ``sys.stderr`` (redirected output and tests see it)."""

    def __init__(self, stream: TextIO | None = None) -> None:
        super().__init__(stream)
        self._fixed = stream

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = self._fixed or sys.stderr
        super().emit(record)


class _DivertToRoot(logging.Filter):
    """On a logger with its own screen handler (DeepSpeed): records go to the root's handlers (the log file,
    the screen when they belong there) and never to its own handler."""

    def filter(self, record: logging.LogRecord) -> bool:
        for handler in logging.getLogger().handlers:
            if record.levelno >= handler.level and handler.filter(record):
                handler.handle(record)
        return False


class RunConsole:
    """The process's logging setup: the screen filter, the held records, the run's log file."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.screen = _Screen(stream)
        self.screen.setLevel(logging.WARNING)
        self.screen.addFilter(on_screen)
        self.screen.setFormatter(logging.Formatter("%(message)s"))
        self.held = _held()
        self.log_file: Path | None = None
        self._showwarning = warnings.showwarning

    def install(self) -> RunConsole:
        """Put the screen and the held log on the root logger; route the libraries' own output through it."""
        root = logging.getLogger()
        if self.screen not in root.handlers:
            root.addHandler(self.screen)
        logging.getLogger("cyclealign_pl").setLevel(logging.INFO)  # INFO records reach the log file
        self.adopt(OWN_HANDLERS)
        deepspeed = logging.getLogger("DeepSpeed")  # its handler is attached when deepspeed is imported
        if not any(isinstance(f, _DivertToRoot) for f in deepspeed.filters):
            deepspeed.addFilter(_DivertToRoot())
        if warnings.showwarning is not self._warning:
            warnings.showwarning = self._warning
        self.begin()
        return self

    def begin(self) -> None:
        """A new command: hold its records until its run directory is known (closing the last run's file)."""
        root = logging.getLogger()
        for handler in [h for h in root.handlers if getattr(h, "_run_log", False) or h is self.held]:
            root.removeHandler(handler)
            handler.close()
        self.held = _held()
        root.addHandler(self.held)
        self.log_file = None

    def adopt(self, names: Iterable[str]) -> None:
        """Route loggers that print on their own (Lightning) through the root's handlers."""
        for name in names:
            logger = logging.getLogger(name)
            for handler in list(logger.handlers):
                if type(handler) is logging.StreamHandler:
                    logger.removeHandler(handler)
            logger.propagate = True

    def _warning(
        self,
        message: Warning | str,
        category: type[Warning],
        filename: str,
        lineno: int,
        file: TextIO | None = None,
        line: str | None = None,
    ) -> None:
        if file is not None:  # an explicit destination: as Python does
            self._showwarning(message, category, filename, lineno, file, line)
            return
        text = warnings.formatwarning(message, category, filename, lineno, line).rstrip()
        user_code = not _is_library(filename)
        logging.getLogger("py.warnings").warning(text, extra={"category": category, "user_code": user_code})

    def attach(self, run_dir: str | os.PathLike[str]) -> Path:
        """Write the held records, and every later one, to the run's log file (appended: a resume adds)."""
        rank = int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")) or 0)
        path = Path(run_dir) / (LOG_NAME if rank == 0 else f"run.rank{rank}.log")
        if self.log_file == path:
            return path
        path.parent.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(path, encoding="utf-8")
        handler.setLevel(logging.INFO)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        self.held.setTarget(handler)
        self.held.flush()
        root = logging.getLogger()
        root.removeHandler(self.held)
        for old in [h for h in root.handlers if getattr(h, "_run_log", False)]:
            root.removeHandler(old)
            old.close()
        handler._run_log = True  # type: ignore[attr-defined]
        self.held = _held()  # not on the root: attached again by the next begin()
        root.addHandler(handler)
        self.log_file = path
        return path

    def uninstall(self) -> None:
        root = logging.getLogger()
        for handler in [self.screen, self.held, *(h for h in root.handlers if getattr(h, "_run_log", False))]:
            if handler in root.handlers:
                root.removeHandler(handler)
            if handler is not self.screen:
                handler.close()
        warnings.showwarning = self._showwarning


def _held() -> MemoryHandler:
    handler = MemoryHandler(capacity=1_000_000, flushLevel=logging.CRITICAL + 1, flushOnClose=False)
    handler.setLevel(logging.INFO)
    return handler


def _is_library(filename: str) -> bool:
    """A file of an installed package or the standard library (not the user's script, not this package)."""
    path = os.path.abspath(filename)
    if path.startswith(os.path.dirname(os.path.abspath(__file__)) + os.sep):
        return False
    return "site-packages" in path or "dist-packages" in path or path.startswith(sys.prefix + os.sep)


_current: RunConsole | None = None


def install(stream: TextIO | None = None) -> RunConsole:
    """Set up this process's screen and held log (idempotent: a second call returns the same console)."""
    global _current
    if _current is None:
        _current = RunConsole(stream)
    return _current.install()


def current() -> RunConsole | None:
    return _current


def attach(run_dir: str | os.PathLike[str]) -> Path | None:
    """The run's log file, once the run directory is known (None when no console was installed)."""
    return _current.attach(run_dir) if _current is not None else None


def reset() -> None:
    """Undo :func:`install` (for callers that run several commands in one process, e.g. tests)."""
    global _current
    if _current is not None:
        _current.uninstall()
        _current = None
