"""The process's random-number states for checkpoints (cyclealign_pl.rng): restoring a captured state
reproduces the draws of torch, Python's ``random`` and numpy, also after a ``weights_only`` checkpoint."""

from __future__ import annotations

import io
import random

import numpy as np
import torch

from cyclealign_pl.rng import capture_rng_state, restore_rng_state


def draws() -> list[float]:
    """A few draws from every stream the state covers, the Gaussian ones included (they cache a value)."""
    return [
        *torch.rand(3).tolist(),
        *torch.randn(3).tolist(),
        random.random(),
        random.gauss(0.0, 1.0),
        *np.random.rand(2).tolist(),
        float(np.random.standard_normal()),
    ]


def test_restoring_a_captured_state_repeats_the_draws_of_every_stream():
    torch.manual_seed(1)
    random.seed(1)
    np.random.seed(1)
    # one Gaussian draw each: Python and numpy now hold a cached second value that is part of the state
    random.gauss(0.0, 1.0)
    np.random.standard_normal()
    state = capture_rng_state()
    first = draws()
    restore_rng_state(state)
    assert draws() == first


def test_the_state_survives_a_weights_only_checkpoint():
    """The module stores the state in every checkpoint, loaded with ``torch.load(weights_only=True)``."""
    torch.manual_seed(2)
    random.seed(2)
    np.random.seed(2)
    buffer = io.BytesIO()
    torch.save({"rng": capture_rng_state()}, buffer)
    first = draws()
    draws()  # the streams move on, as a run does after its checkpoint

    buffer.seek(0)
    restore_rng_state(torch.load(buffer, weights_only=True)["rng"])
    assert draws() == first


def test_a_captured_state_can_be_restored_again_later():
    """Draws after a restore leave the captured state as it was: a second restore repeats them."""
    state = capture_rng_state()
    first = draws()
    restore_rng_state(state)
    draws()
    restore_rng_state(state)
    assert draws() == first
