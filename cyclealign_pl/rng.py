"""The process's random-number states, as plain tensors and lists, for checkpoints.

A resumed run must sample the same candidates as the run it replaces, so that the steps it redoes send the
judge the very requests it already answered (served from the cache, not paid again). Lightning does not
checkpoint RNG states; the module saves these with every checkpoint and restores them just before the first
training step after a resume (after the data loader has started, so nothing moves the streams in between).

Only types that ``torch.load(weights_only=True)`` accepts are stored (numpy's state: a tensor and numbers).
"""

from __future__ import annotations

import random
from typing import Any

import torch

try:  # numpy is optional for the package; transformers and datasets use it when present
    import numpy as np
except ImportError:  # pragma: no cover
    np = None  # type: ignore[assignment]


def capture_rng_state() -> dict[str, Any]:
    """torch (CPU and every CUDA device), Python ``random`` and numpy global states."""
    version, internal, gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": [version, list(internal), gauss],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if np is not None:
        kind, keys, pos, has_gauss, cached = np.random.get_state()
        keys = torch.from_numpy(keys.astype("int64"))
        state["numpy"] = [kind, keys, int(pos), int(has_gauss), float(cached)]
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Set the states :func:`capture_rng_state` returned (CUDA only when the device count matches)."""
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    if np is not None and state.get("numpy") is not None:
        kind, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((kind, keys.numpy().astype("uint32"), pos, has_gauss, cached))


__all__ = ["capture_rng_state", "restore_rng_state"]
