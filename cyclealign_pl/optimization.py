"""Manual optimization for the cycle: one optimizer step per round, collective under data parallelism.

A mixin of ``CycleAlignModule`` (it needs ``model``, ``counters``, ``gradient_clip_val``, the factories and
``_any_rank``): the cycle calls ``_update(loss)`` once per round; DeepSpeed clips and checks overflow itself.
"""

from __future__ import annotations

import logging
import math

import torch
from torch import Tensor

log = logging.getLogger(__name__)


class ManualOptimization:
    """``configure_optimizers`` and the optimizer step of a round, skipping what must not be applied."""

    def configure_optimizers(self):
        trainable = [p for p in self.model.parameters() if p.requires_grad]  # with LoRA: the adapters
        optimizer = self.optimizer_factory(trainable)
        if self.lr_scheduler_factory is None:
            return optimizer
        scheduler = self.lr_scheduler_factory(optimizer)
        if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            raise ValueError(
                "model.lr_scheduler: ReduceLROnPlateau needs a monitored metric, which the cycle does not "
                "have; use a schedule by steps (e.g. LinearLR for a warm-up, CosineAnnealingLR)"
            )
        # manual optimization: Lightning keeps (and checkpoints) the schedule, _update steps it
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def _configure_deepspeed(self) -> None:
        """DeepSpeed clips inside its engine: hand it ``gradient_clip_val``; a different value in its config
        is a conflict, not something to ignore."""
        if not self._is_deepspeed():
            return
        config = self.trainer.strategy.config
        clip = float(self.gradient_clip_val or 0.0)
        given = config.get("gradient_clipping") if isinstance(config, dict) else None
        if given is not None and float(given) != clip:
            raise ValueError(
                f"model.gradient_clip_val={self.gradient_clip_val} and the DeepSpeed config's "
                f"gradient_clipping={given} disagree: set one of them"
            )
        config["gradient_clipping"] = clip

    def _update(self, loss: Tensor | None) -> bool:
        """One optimizer step; skips (and counts) a missing or non-finite loss or gradient. Collective under
        data parallelism: when no process has a loss every one skips; otherwise the others backpropagate a
        zero connected to all parameters, so every rank joins the all-reduce and applies the same step."""
        if loss is not None and not torch.isfinite(loss).item():
            self._skip_nonfinite(f"non-finite loss {float(loss.detach())}: update skipped")
            loss = None
        if not self._any_rank(loss is not None):
            return False
        if loss is None:
            loss = sum(p.sum() for p in self.model.parameters() if p.requires_grad) * 0.0
        optimizer = self.optimizers()
        optimizer.zero_grad()
        self.manual_backward(loss)
        if not self._is_deepspeed():
            if self.gradient_clip_val is not None:
                self.clip_gradients(
                    optimizer, gradient_clip_val=self.gradient_clip_val, gradient_clip_algorithm="norm"
                )
            grads = [p.grad.detach().float().norm() for p in self.model.parameters() if p.grad is not None]
            if not math.isfinite(torch.linalg.vector_norm(torch.stack(grads)).item()):  # same on every rank
                self._skip_nonfinite("non-finite gradient norm: update skipped")
                optimizer.zero_grad()
                return False
        optimizer.step()
        # DeepSpeed's ZeRO optimizer checks the gradients itself and skips a step on inf/NaN ("overflow")
        if self._is_deepspeed() and getattr(getattr(optimizer, "optimizer", optimizer), "overflow", False):
            self._skip_nonfinite("non-finite gradient: DeepSpeed skipped the update")
            return False
        if (scheduler := self.lr_schedulers()) is not None:
            scheduler.step()  # once per applied optimizer step
        return True

    def _skip_nonfinite(self, why: str) -> None:
        self.counters.nonfinite_updates += 1
        log.warning(why)

    def _is_deepspeed(self) -> bool:
        return type(self.trainer.strategy).__name__.startswith("DeepSpeed")
