"""Files that must survive a crash or a full disk: atomic checkpoints, the run's identity, storage errors.

* :class:`AtomicCheckpointIO` - Lightning's ``CheckpointIO`` plugin for checkpoints: each one is written to a
  temporary file *in its own directory*, fsynced and renamed over the old one, so a kill or a full disk at
  any moment leaves either the old checkpoint or the new one, never a truncated file. (Lightning's own
  ``TorchCheckpointIO`` writes through an fsspec transaction whose temporary file is in ``/tmp``; on another
  filesystem the commit is a copy over the old file, which a kill or ``ENOSPC`` truncates.)
* :func:`run_record` / :func:`update_run_record` - ``<default_root_dir>/run.json``: the run's id, fixed the
  first time the run starts (before any request or checkpoint), and whether its last ``fit`` got to its end.
* :class:`CSVLogger` - Lightning's, with ``metrics.csv`` rewritten atomically when a column appears.
* :class:`StorageError` - a write the environment refused (full disk, read-only filesystem, no permission):
  one line naming the path, for the CLI's exit status 3.
"""

from __future__ import annotations

import csv
import errno
import io
import json
import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import torch
from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch import loggers as lightning_loggers
from lightning.pytorch.loggers.csv_logs import ExperimentWriter

TEMP_MARK = ".tmp-"  # temporary files: "<name>.tmp-<pid>-<hex>", never ending in ".ckpt"
RUN_RECORD = "run.json"
CHECKPOINTS = "checkpoints"  # <default_root_dir>/checkpoints: the run's checkpoints
# errors of the environment, not of the input: the same command works once the disk has room / is writable
ENVIRONMENT_ERRNOS = frozenset(
    {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO}
)


class StorageError(RuntimeError):
    """The environment refused a write (one line: what, where, why, and what was kept)."""

    def __init__(self, message: str, path: str | os.PathLike[str] | None = None) -> None:
        super().__init__(message)
        self.path = None if path is None else str(path)


def is_environment_error(err: BaseException) -> bool:
    """A full disk, a read-only filesystem, a permission or an I/O error (not a missing input file)."""
    return isinstance(err, OSError) and err.errno in ENVIRONMENT_ERRNOS


def describe(err: OSError) -> str:
    """``"cannot write <path>: No space left on device"`` for an OSError."""
    what = "cannot access" if err.errno in (errno.EACCES, errno.EPERM, errno.EIO) else "cannot write"
    return f"{what} {failed_path(err) or '(a file)'}: {err.strerror or err}"


def failed_path(err: OSError) -> str | None:
    """The file an OSError is about: its ``filename``, else (a failed ``write()`` carries none) the file
    object being written in the innermost frame of its traceback that holds one."""
    if err.filename is not None:
        return str(err.filename)
    frames = []
    tb = err.__traceback__
    while tb is not None:
        frames.append(tb.tb_frame)
        tb = tb.tb_next
    for frame in reversed(frames):
        for value in frame.f_locals.values():
            name = getattr(value, "name", None)
            if hasattr(value, "write") and isinstance(name, str) and os.sep in name:
                return name
    return None


def atomic_write(path: str | os.PathLike[str], write: Callable[[IO[bytes]], Any]) -> None:
    """Call ``write(f)`` on a temporary file beside ``path``, fsync it and rename it to ``path``.

    Any failure (a full disk, an exception, ``KeyboardInterrupt``) removes the temporary file and leaves
    ``path`` as it was; a kill leaves at most the temporary file, which no reader takes for ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f"{path.name}{TEMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}")
    recorder = None
    try:
        with open(temp, "wb") as f:
            recorder = _Recording(f)
            write(recorder)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp, path)
    except BaseException as err:
        try:
            temp.unlink()
        except OSError:
            pass
        if not isinstance(err, OSError) and recorder is not None and recorder.error is not None:
            err = recorder.error  # torch.save reports a failed write as a RuntimeError without its cause
        if is_environment_error(err):
            kept = "the earlier one is as it was" if path.exists() else "there was no earlier one"
            raise StorageError(
                f"cannot write {path}: {err.strerror or err}; nothing partial was left ({kept}): make room "
                "or make it writable, then resume with --ckpt_path last",
                path,
            ) from err
        raise
    _fsync_dir(path.parent)


class _Recording:
    """A binary file that remembers the OSError of a failed write (for writers that hide it)."""

    def __init__(self, f: IO[bytes]) -> None:
        self._f = f
        self.error: OSError | None = None

    def write(self, data: Any) -> int:
        try:
            return self._f.write(data)
        except OSError as err:
            self.error = err
            raise

    def __getattr__(self, name: str) -> Any:
        return getattr(self._f, name)


def _fsync_dir(folder: Path) -> None:
    """Make the rename durable (POSIX: the directory entry is data of the directory)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def remove_temporaries(folder: str | os.PathLike[str]) -> list[Path]:
    """Delete temporary files left in ``folder`` by a writer that was killed; what was removed."""
    folder = Path(folder)
    removed = []
    if folder.is_dir():
        for p in folder.iterdir():
            if TEMP_MARK in p.name and p.is_file():
                try:
                    p.unlink()
                    removed.append(p)
                except OSError:
                    pass
    return removed


def _is_local(path: Any) -> bool:
    text = str(path)
    return "://" not in text or text.startswith("file://")


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's ``TorchCheckpointIO`` with atomic local writes (:func:`atomic_write`); remote URLs
    (``s3://``...) keep Lightning's object-store upload, which is atomic there."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        if not _is_local(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        local = Path(str(path).removeprefix("file://"))
        remove_temporaries(local.parent)
        atomic_write(local, lambda f: torch.save(checkpoint, f))


# -- metrics.csv -------------------------------------------------------------------------------------------


class _MetricsWriter(ExperimentWriter):
    """Lightning's CSV writer, but the rewrite of ``metrics.csv`` when a column appears is atomic (Lightning
    truncates the file and writes it again: a full disk then loses every row written before)."""

    def _rewrite_with_new_header(self, fieldnames: list[str]) -> None:
        if not _is_local(self.metrics_file_path):
            super()._rewrite_with_new_header(fieldnames)
            return
        with open(self.metrics_file_path, newline="") as f:
            rows = list(csv.DictReader(f))
        text = io.StringIO(newline="")
        writer = csv.DictWriter(text, fieldnames=fieldnames)
        writer.writeheader()
        writer.writerows(rows)
        data = text.getvalue().encode("utf-8")
        atomic_write(self.metrics_file_path, lambda f: f.write(data))


class CSVLogger(lightning_loggers.CSVLogger):
    """Lightning's ``CSVLogger`` whose ``metrics.csv`` keeps its rows through a full disk (the rewrite on a
    new column is atomic; appended rows never touch the earlier ones)."""

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _MetricsWriter(log_dir=self.log_dir)
        return self._experiment


# -- the run's record ---------------------------------------------------------------------------------------


def run_record(root: str | os.PathLike[str]) -> dict[str, Any]:
    """``<root>/run.json`` (empty if there is none yet or it cannot be read)."""
    try:
        record = json.loads((Path(root) / RUN_RECORD).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def update_run_record(root: str | os.PathLike[str], **values: Any) -> dict[str, Any]:
    """Merge ``values`` into ``<root>/run.json`` (written atomically); the record."""
    record = {**run_record(root), **values}
    data = (json.dumps(record, indent=1, sort_keys=True) + "\n").encode("utf-8")
    atomic_write(Path(root) / RUN_RECORD, lambda f: f.write(data))
    return record


def run_identity(root: str | os.PathLike[str], proposed: str | None = None) -> str:
    """The run's id: the one recorded in ``<root>/run.json``, else ``proposed`` (or a new one), recorded now,
    before anything is spent, so that a crash before the first checkpoint keeps the run's spend."""
    recorded = run_record(root).get("run_id")
    if isinstance(recorded, str) and recorded:
        return recorded
    run_id = proposed or uuid.uuid4().hex
    update_run_record(root, run_id=run_id)
    return run_id


__all__ = [
    "AtomicCheckpointIO",
    "CSVLogger",
    "StorageError",
    "atomic_write",
    "describe",
    "failed_path",
    "is_environment_error",
    "remove_temporaries",
    "run_identity",
    "run_record",
    "update_run_record",
]


def log_dir(trainer: Any) -> str:
    """Where a run's logs and evaluation files go: the logger's version folder, else the run's root (every
    process must ask: the logger's folder is agreed collectively)."""
    return trainer.log_dir or trainer.default_root_dir


def stop_checkpoint_path(trainer: Any) -> str:
    """Where a stop saves: the checkpoint callback's ``last.ckpt`` (so ``--ckpt_path last`` resumes from it),
    else ``<default_root_dir>/checkpoints/stopped.ckpt``."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    callback = trainer.checkpoint_callback
    if isinstance(callback, ModelCheckpoint) and callback.save_last and callback.dirpath:
        return os.path.join(callback.dirpath, callback.CHECKPOINT_NAME_LAST + callback.FILE_EXTENSION)
    return os.path.join(trainer.default_root_dir, CHECKPOINTS, "stopped.ckpt")
