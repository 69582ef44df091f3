"""The recipe of the evaluator's reward head: ``python -m cyclealign_pl train-evaluator --out <folder>``.

Split the shipped pairs by prompt, encode every reply once with the frozen encoder, train a linear
Bradley-Terry head per L2 penalty, keep the best on validation, write it with its card (docs/real_models.md).
"""

from __future__ import annotations

import json
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
    PairSplit,
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

L2_PENALTIES: tuple[float, ...] = (1e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0, 3.0, 10.0)


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
    features: PairFeatures, l2: float = 1e-2, hidden: int = 0, steps: int = 100, seed: int = 0
) -> RewardHead:
    """A head trained full batch (L-BFGS) on the Bradley-Terry loss + ``l2`` x the squared weights,
    standardised on the training replies."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = RewardHead(features.chosen.shape[-1], hidden)
        head.fit_standardisation(torch.cat([features.chosen, features.rejected]))
        if not steps:
            return head.eval()
        weights = [p for name, p in head.named_parameters() if name.endswith("weight")]
        optimizer = torch.optim.LBFGS(head.parameters(), max_iter=steps, line_search_fn="strong_wolfe")

        def closure() -> Tensor:
            optimizer.zero_grad()
            margin = head(features.chosen) - head(features.rejected)
            loss = -F.logsigmoid(margin).mean() + l2 * sum((w**2).sum() for w in weights)
            loss.backward()
            return loss

        optimizer.step(closure)
    return head.eval()


@torch.no_grad()
def head_accuracy(head: RewardHead, features: PairFeatures) -> Accuracy:
    return pairwise_accuracy(head(features.chosen), head(features.rejected))


def cached_features(
    model: HumanPreferenceRewardModel,
    parts: dict[str, Sequence[PromptRow]],
    settings: dict[str, Any],
    cache: str | Path | None,
) -> dict[str, PairFeatures]:
    """Each part's features, read from ``cache`` when it holds the same settings and rows, else encoded (and
    written there)."""
    key = {**settings, "rows": {name: [row["id"] for row in rows] for name, rows in parts.items()}}
    if cache is not None and Path(cache).is_file():
        saved = torch.load(cache, weights_only=True)
        if saved.get("key") == json.dumps(key, sort_keys=True):
            log.info("features read from %s", cache)
            return {name: PairFeatures(*saved["features"][name]) for name in parts}
    features = {name: encode_pairs(model, rows) for name, rows in parts.items()}
    if cache is not None:
        Path(cache).parent.mkdir(parents=True, exist_ok=True)
        payload = {name: tuple(value) for name, value in features.items()}
        torch.save({"key": json.dumps(key, sort_keys=True), "features": payload}, cache)
    return features


def build(
    out: str | Path,
    encoder: str = DEFAULT_ENCODER,
    view: str = "reply",
    max_length: int = 64,
    l2_penalties: Sequence[float] = L2_PENALTIES,
    steps: int = 100,
    validation_fraction: float = 0.15,
    seed: int = 0,
    batch_size: int = 32,
    features_cache: str | Path | None = None,
) -> dict[str, Any]:
    """Run the recipe on the shipped pairs and write the head to ``out``; return its card."""
    start = time.perf_counter()
    reserved = load_reserved_pairs()
    split = split_pairs(load_training_pairs(), reserved, validation_fraction, seed)
    model = HumanPreferenceRewardModel(
        head=None, encoder=encoder, view=view, max_length=max_length, batch_size=batch_size, seed=seed
    )
    weights = resolve_encoder(encoder) / "model.safetensors"
    encoder_sha256 = file_digest(weights) if weights.is_file() else None
    parts = {"train": split.train, "validation": split.validation, "test": reserved}
    settings = {"encoder_sha256": encoder_sha256, "view": view, "max_length": max_length}
    data = cached_features(model, parts, settings, features_cache)
    encoded = time.perf_counter() - start
    l2, head, tried = select_head(data, l2_penalties, steps, seed)
    card = {
        **_recipe_card(encoder, encoder_sha256, view, max_length, steps, l2, tried, seed, split, reserved),
        "pairwise_accuracy": {
            name: head_accuracy(head, features)._asdict() for name, features in data.items()
        },
        "seconds": {"encode": round(encoded, 1), "total": round(time.perf_counter() - start, 1)},
    }
    save_head(head, out, card)
    return card


def select_head(
    data: dict[str, PairFeatures], l2_penalties: Sequence[float], steps: int, seed: int
) -> tuple[float, RewardHead, dict[str, float]]:
    """A head trained on ``data["train"]`` per L2 penalty; the best on ``data["validation"]`` (ties: the
    stronger penalty), its penalty, and the validation accuracy of each penalty tried."""
    trials = []
    for l2 in l2_penalties:
        head = train_head(data["train"], l2, steps=steps, seed=seed)
        accuracy = head_accuracy(head, data["validation"]).accuracy
        trials.append((accuracy, l2, head))
        log.info("L2 %g: validation accuracy %.3f", l2, accuracy)
    _, l2, head = max(trials, key=lambda t: t[:2])
    return l2, head, {str(penalty): acc for acc, penalty, _ in trials}


def _recipe_card(
    encoder: str,
    encoder_sha256: str | None,
    view: str,
    max_length: int,
    steps: int,
    l2: float,
    tried: dict[str, float],
    seed: int,
    split: PairSplit,
    reserved: Sequence[PromptRow],
) -> dict[str, Any]:
    """The head card's settings and data counts (``head.json``; the accuracies are added by :func:`build`)."""
    package = PACKAGED_ENCODERS.get(encoder.removeprefix("local:"))
    return {
        "encoder": encoder,
        "encoder_package": f"{package[0]}==0.1.0" if package else None,
        "encoder_sha256": encoder_sha256,
        "view": view,
        "input": {
            "reply": "the reply alone",
            "dialogue": "HH-format dialogue + ' ' + reply, cut from the left",
        }[view]
        + ", as [CLS] ... [SEP]",
        "max_length": max_length,
        "features": "final hidden state of [CLS] and the mean over tokens (frozen encoder), standardised",
        "loss": "Bradley-Terry -log sigmoid(r_chosen - r_rejected) + l2 * |w|^2, full batch L-BFGS",
        "steps": steps,
        "l2": l2,
        "validation_accuracy_tried": tried,
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
    }


def main(argv: Sequence[str] | None = None) -> None:
    from cyclealign_pl.cli_parser import OneLineArgumentParser
    from cyclealign_pl.commands import parser_names

    parser = OneLineArgumentParser(**parser_names("train-evaluator"))
    parser.add_argument("--out", default=str(ASSETS / "hh-harmless-minilm"), help="folder for the head")
    parser.add_argument("--encoder", default=DEFAULT_ENCODER)
    parser.add_argument("--view", default="reply", choices=("reply", "dialogue"))
    parser.add_argument("--max_length", type=int, default=64)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--features_cache", default=None, help="a .pt file to keep the encoded features in")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    card = build(
        args.out,
        args.encoder,
        args.view,
        args.max_length,
        steps=args.steps,
        seed=args.seed,
        features_cache=args.features_cache,
    )
    for name, acc in card["pairwise_accuracy"].items():
        print(f"{name:>10}: {acc['accuracy']:.3f} +- {acc['standard_error']:.3f} over {acc['n']} pairs")
    print(f"wrote {args.out} ({card['seconds']['total']:.0f} s)")


if __name__ == "__main__":
    main()
