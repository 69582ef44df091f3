"""Where a run's files go: everything under ``trainer.default_root_dir``, one run per directory.

A logger without ``save_dir``, a checkpoint callback without ``dirpath`` and a relative judge ``cache_path``
are placed under the root (:func:`place_run_files`); a fresh ``fit`` into a root that holds checkpoints is
refused (:func:`refuse_second_run`), so ``--ckpt_path last`` always means this run's newest ``last*.ckpt``.
All of it reads the parsed configuration before any class is built: a refusal costs no model load. The
layout: README (Usage).
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CHECKPOINT_SUFFIX = ".ckpt"


class RunDirError(ValueError):
    """The run directory does not allow what was asked (one line: what is there and what to do)."""


def root_dir(config: Any) -> Path:
    """``trainer.default_root_dir``, or the working directory as in Lightning."""
    return Path(_get(config, "trainer", "default_root_dir") or os.getcwd())


def place_run_files(config: Any) -> None:
    """Put the logger, the checkpoints and a relative judge cache under the root (settings left unset
    only)."""
    from cyclealign_pl import storage  # imports Lightning: not at the top of this light module

    root = root_dir(config)
    for logger in _specs(_get(config, "trainer", "logger")):
        init_args = logger.get("init_args")
        if init_args is not None and "save_dir" in init_args and init_args.get("save_dir") is None:
            init_args["save_dir"] = str(root)
    for callback in _checkpoint_callbacks(config):
        if callback["init_args"].get("dirpath") is None:
            callback["init_args"]["dirpath"] = str(root / storage.CHECKPOINTS)
    judge_args = _get(config, "model", "judge", "init_args")
    cache = judge_args.get("cache_path") if judge_args is not None and hasattr(judge_args, "get") else None
    if isinstance(cache, str) and cache and not Path(cache).is_absolute():
        judge_args["cache_path"] = str(root / cache)


def checkpoint_dirs(config: Any) -> list[Path]:
    """The folders of the configured checkpoint callbacks (after :func:`place_run_files`)."""
    dirs = [
        Path(c["init_args"]["dirpath"])
        for c in _checkpoint_callbacks(config)
        if c["init_args"].get("dirpath")
    ]
    return list(dict.fromkeys(dirs))


def saved_checkpoints(dirs: list[Path]) -> list[Path]:
    """The checkpoints in ``dirs`` (files, or DeepSpeed's checkpoint directories), oldest first."""
    found = [p for d in dirs if d.is_dir() for p in d.iterdir() if p.suffix == CHECKPOINT_SUFFIX]
    return sorted(found, key=lambda p: p.stat().st_mtime)


def resolve_last(dirs: list[Path]) -> Path | None:
    """The newest ``last*.ckpt`` in ``dirs`` (Lightning's meaning of ``ckpt_path="last"``), or None."""
    last = [p for p in saved_checkpoints(dirs) if p.name.startswith("last")]
    return last[-1] if last else None


def unreadable(checkpoint: Path) -> str | None:
    """Why a checkpoint file does not load (truncated, corrupt), or None if it does. Memory-mapped, so a
    large checkpoint costs little to check; DeepSpeed's checkpoint directories are taken as they are."""
    if not checkpoint.is_file():
        return None
    import torch

    try:
        torch.load(checkpoint, map_location="cpu", mmap=True, weights_only=False)  # the run's own file
    except Exception as err:  # torch raises RuntimeError, EOFError, pickle errors... for a damaged file
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        return f"{type(err).__name__}: {first[:120]}"
    return None


def resolve_resumable(dirs: list[Path]) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The newest checkpoint of ``dirs`` that loads, ``last*.ckpt`` first, then the others (newest first);
    and the newer ones passed over with the reason (a kill or a full disk under an older version)."""
    saved = saved_checkpoints(dirs)
    order = [p for p in reversed(saved) if p.name.startswith("last")]
    order += [p for p in reversed(saved) if not p.name.startswith("last")]
    skipped = []
    for checkpoint in order:
        why = unreadable(checkpoint)
        if why is None:
            return checkpoint, skipped
        skipped.append((checkpoint, why))
    return None, skipped


def refuse_second_run(dirs: list[Path], ckpt_path: str | None) -> None:
    """A fresh ``fit`` (or one from another run's checkpoint) must not write into a root holding a run."""
    existing = saved_checkpoints(dirs)
    if not existing:
        return
    if ckpt_path is not None and any(_inside(Path(ckpt_path), d) for d in dirs):
        return  # resuming this root's own run
    folder = existing[-1].parent
    names = ", ".join(p.name for p in existing[-3:])
    what = "a new run" if ckpt_path is None else f"a run from {ckpt_path}"
    raise RunDirError(
        f"{folder} already holds a run's checkpoints ({names}): resume it with --ckpt_path last, or start "
        f"{what} in another --trainer.default_root_dir"
    )


def _inside(path: Path, folder: Path) -> bool:
    try:
        path.resolve().relative_to(folder.resolve())
        return True
    except ValueError:
        return False


@dataclass(frozen=True)
class CheckpointProgress:
    """How far a checkpoint's training got, read from Lightning's loop state and the module's counters."""

    epochs: int  # epochs whose training batches are all done
    batches: int  # training steps (batches of prompts) over the run
    global_step: int  # optimizer steps
    counters: dict[str, Any]


def read_checkpoint_progress(checkpoint: Path) -> CheckpointProgress | None:
    """The progress stored in a ``.ckpt`` file (None for DeepSpeed directories and foreign files)."""
    if not checkpoint.is_file():
        return None
    import torch

    state = torch.load(checkpoint, map_location="cpu", mmap=True, weights_only=False)  # the run's own file
    fit_loop = state.get("loops", {}).get("fit_loop", {})
    try:
        epochs = int(fit_loop["epoch_progress"]["current"]["processed"])
        batches = int(fit_loop["epoch_loop.batch_progress"]["total"]["completed"])
    except (KeyError, TypeError, ValueError):
        return None
    counters = dict(state.get("cyclealign", {}).get("counters", {}))
    return CheckpointProgress(epochs, batches, int(state.get("global_step", 0)), counters)


def finished_message(
    progress: CheckpointProgress, max_epochs: int | None, max_steps: int | None
) -> str | None:
    """Why a resume from ``progress`` has nothing left to do (Lightning's ``fit_loop.done``), or None."""
    max_steps = -1 if max_steps is None else max_steps
    if max_epochs is None:  # Lightning's default: 1000 epochs unless max_steps bounds the run
        max_epochs = 1000 if max_steps == -1 else -1
    steps = progress.counters.get("steps", progress.batches)
    if max_steps != -1 and progress.global_step >= max_steps:
        return (
            f"already finished ({progress.global_step} of {max_steps} optimizer steps, trainer.max_steps; "
            f"{steps} steps); nothing to do"
        )
    if max_epochs != -1 and progress.epochs >= max_epochs:
        per_epoch = steps // max(progress.epochs, 1)
        planned = per_epoch * max_epochs
        return (
            f"already finished ({steps} of {planned} steps, {progress.epochs} of {max_epochs} epochs); "
            "nothing to do: raise --trainer.max_epochs to train on, or start a new run in another "
            "--trainer.default_root_dir"
        )
    return None


# -- reading the parsed configuration --------------------------------------------------------------------


def _get(config: Any, *keys: str) -> Any:
    value = config
    for key in keys:
        if value is None or not hasattr(value, "get"):
            return None
        value = value.get(key)
    return value


def _specs(value: Any) -> Iterator[Any]:
    """The ``{class_path, init_args}`` entries of a setting that holds one, a list, or none."""
    for item in value if isinstance(value, list) else [value]:
        if hasattr(item, "get") and item.get("class_path"):
            yield item


def _checkpoint_callbacks(config: Any) -> list[Any]:
    from lightning.pytorch.callbacks import ModelCheckpoint

    found = []
    for callback in _specs(_get(config, "trainer", "callbacks")):
        cls = _import(callback["class_path"])
        if (
            isinstance(cls, type)
            and issubclass(cls, ModelCheckpoint)
            and callback.get("init_args") is not None
        ):
            found.append(callback)
    return found


def _import(class_path: str) -> Any:
    module_name, _, name = class_path.rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError):
        return None
