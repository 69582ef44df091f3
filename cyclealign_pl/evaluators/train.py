"""The recipe of the evaluator's reward head: ``python -m cyclealign_pl.evaluators.train --out <folder>``.

1. Split the shipped pairs by prompt (``pairs.py``): train, validation, and the runs' reserved pairs (test).
2. Encode every (dialogue, reply) once with the frozen encoder: pooled features of chosen and rejected.
3. Train the head on the Bradley-Terry loss ``-log sigmoid(r_chosen - r_rejected)``, full batch, seeded,
   for each weight decay of a small grid; keep the one with the best validation accuracy.
4. Report pairwise accuracy (chosen scored above rejected) on validation and on the held-out reserved pairs,
   and write the head and its card (settings, data counts, accuracies, the encoder's sha256).

Deterministic for a seed on one machine; about 10 minutes of encoding on 2 busy cores, seconds of training.
"""

from __future__ import annotations

import argparse
import logging
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from cyclealign_pl.data.rows import PromptRow
from cyclealign_pl.evaluators.model import RewardHead, file_digest, save_head
from cyclealign_pl.evaluators.pairs import (
    PAIRS_SPLIT,
    key_digest,
    load_reserved_pairs,
    load_training_pairs,
    prompt_key,
    split_pairs,
)
from cyclealign_pl.evaluators.reward import (
    ASSETS,
    DEFAULT_ENCODER,
    PACKAGED_ENCODERS,
    HumanPreferenceRewardModel,
    resolve_encoder,
)

log = logging.getLogger(__name__)

WEIGHT_DECAYS: tuple[float, ...] = (1e-3, 1e-2, 1e-1, 1.0)
HIDDEN_SIZES: tuple[int, ...] = (0, 32)  # 0: a linear head


class PairFeatures(NamedTuple):
    chosen: Tensor
    rejected: Tensor


class Accuracy(NamedTuple):
    """Pairwise accuracy (a tie counts half) over n pairs, and its binomial standard error."""

    n: int
    accuracy: float
    standard_error: float


def pairwise_accuracy(chosen: Sequence[float] | Tensor, rejected: Sequence[float] | Tensor) -> Accuracy:
    """Share of pairs whose chosen reply scores above the rejected one (ties: half)."""
    a, b = torch.as_tensor(chosen, dtype=torch.float64), torch.as_tensor(rejected, dtype=torch.float64)
    if a.numel() == 0:
        return Accuracy(0, math.nan, math.nan)
    acc = float(((a > b).double() + 0.5 * (a == b).double()).mean())
    return Accuracy(a.numel(), acc, math.sqrt(acc * (1 - acc) / a.numel()))


def encode_pairs(model: HumanPreferenceRewardModel, rows: Sequence[PromptRow]) -> PairFeatures:
    prompts = [row["prompt"] for row in rows]
    return PairFeatures(
        model.features(prompts, [row["chosen"] for row in rows]),
        model.features(prompts, [row["rejected"] for row in rows]),
    )


def train_head(
    features: PairFeatures,
    hidden: int = 0,
    weight_decay: float = 1e-2,
    steps: int = 300,
    lr: float = 1e-2,
    seed: int = 0,
) -> RewardHead:
    """A head trained full-batch (AdamW) on the Bradley-Terry loss, standardised on the training replies."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = RewardHead(features.chosen.shape[-1], hidden)
        head.fit_standardisation(torch.cat([features.chosen, features.rejected]))
        optimizer = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
        for _ in range(steps):
            loss = -F.logsigmoid(head(features.chosen) - head(features.rejected)).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return head.eval()


@torch.no_grad()
def head_accuracy(head: RewardHead, features: PairFeatures) -> Accuracy:
    return pairwise_accuracy(head(features.chosen), head(features.rejected))


def build(
    out: str | Path,
    encoder: str = DEFAULT_ENCODER,
    max_length: int = 128,
    hidden_sizes: Sequence[int] = HIDDEN_SIZES,
    weight_decays: Sequence[float] = WEIGHT_DECAYS,
    steps: int = 300,
    validation_fraction: float = 0.15,
    seed: int = 0,
    batch_size: int = 32,
) -> dict[str, Any]:
    """Run the recipe on the shipped pairs and write the head to ``out``; return its card."""
    start = time.perf_counter()
    torch.manual_seed(seed)
    reserved = load_reserved_pairs()
    split = split_pairs(load_training_pairs(), reserved, validation_fraction, seed)
    model = HumanPreferenceRewardModel(
        head=None, encoder=encoder, max_length=max_length, batch_size=batch_size, seed=seed
    )
    data = {
        name: encode_pairs(model, rows)
        for name, rows in (("train", split.train), ("validation", split.validation), ("test", reserved))
    }
    encoded = time.perf_counter() - start
    trials = []
    for hidden in hidden_sizes:
        for weight_decay in weight_decays:
            head = train_head(data["train"], hidden, weight_decay, steps, seed=seed)
            accuracy = head_accuracy(head, data["validation"]).accuracy
            trials.append((accuracy, -hidden, weight_decay, head))
            log.info("hidden %d, weight decay %g: validation accuracy %.3f", hidden, weight_decay, accuracy)
    # the best validation accuracy; ties: the smaller head, then the stronger decay
    _, _, weight_decay, head = max(trials, key=lambda t: t[:3])
    accuracies = {name: head_accuracy(head, features)._asdict() for name, features in data.items()}
    encoder_path = resolve_encoder(encoder)
    weights = encoder_path / "model.safetensors"
    package = PACKAGED_ENCODERS.get(encoder.removeprefix("local:"))
    card = {
        "encoder": encoder,
        "encoder_package": f"{package[0]}" if package else None,
        "encoder_sha256": file_digest(weights) if weights.is_file() else None,
        "input": "HH-format dialogue + ' ' + reply, [CLS] ... [SEP], cut from the left",
        "max_length": max_length,
        "features": "final hidden state of [CLS] and the mean over tokens (frozen encoder)",
        "loss": "Bradley-Terry: -log sigmoid(r_chosen - r_rejected), full batch AdamW lr 1e-2",
        "steps": steps,
        "weight_decay": weight_decay,
        "validation_accuracy_tried": {f"hidden={-h},weight_decay={wd}": acc for acc, h, wd, _ in trials},
        "seed": seed,
        "data": {
            "source": f"HH-RLHF harmless-base/test ({PAIRS_SPLIT}: lines 301-2312), MIT, Anthropic",
            "split": "by first human turn (sha256 of seed:key); none that opens like a line 1-300 row",
            "train_pairs": len(split.train),
            "validation_pairs": len(split.validation),
            "excluded_pairs": len(split.excluded),
            "test_pairs": len(reserved),
            "test": "lines 1-300 (the runs' prompts, the package's sample): never trained on",
        },
        "trained_prompt_keys": sorted({key_digest(prompt_key(row["prompt"])) for row in split.train}),
        "pairwise_accuracy": accuracies,
        "seconds": {"encode": round(encoded, 1), "total": round(time.perf_counter() - start, 1)},
    }
    save_head(head, out, card)
    return card


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ASSETS / "hh-harmless-minilm"), help="folder for the head")
    parser.add_argument("--encoder", default=DEFAULT_ENCODER)
    parser.add_argument("--max_length", type=int, default=128)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    card = build(args.out, args.encoder, args.max_length, steps=args.steps, seed=args.seed)
    for name, acc in card["pairwise_accuracy"].items():
        print(f"{name:>10}: {acc['accuracy']:.3f} +- {acc['standard_error']:.3f} over {acc['n']} pairs")
    print(f"wrote {args.out} ({card['seconds']['total']:.0f} s)")


if __name__ == "__main__":
    main()
