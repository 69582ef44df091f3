"""A judge that ranks by a local reward model: the offline black box, and the reference ranker/evaluator.

Input formats: ``"plain"`` (the HH-format dialogue, then the reply) and ``"oasst"`` (the paper's evaluator,
OpenAssistant's oasst-rm-2-pythia-6.9b-epoch-1: ``<|prompter|>...<eos><|assistant|>...<eos>`` turns).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, Literal

import torch

from cyclealign_pl.hf import OFFLINE_TOKENIZER, load_reward_model, load_tokenizer
from cyclealign_pl.judges.base import Judge, Judgment, RankRequest
from cyclealign_pl.ranking import rank_by_scores

RewardFormat = Literal["plain", "oasst"]


def format_for_reward_model(
    prompt: str, response: str, input_format: RewardFormat, eos_token: str = ""
) -> str:
    """The reward model's input text for one (HH-format dialogue prompt, reply) pair."""
    if input_format == "plain":
        return f"{prompt.rstrip()} {response.strip()}"
    if input_format == "oasst":
        from cyclealign_pl.data.hh_rlhf import parse_dialogue

        # without the open "Assistant:" turn
        turns = [turn for turn in parse_dialogue(prompt).turns if turn.text]
        tags = {"Human": "<|prompter|>", "Assistant": "<|assistant|>"}
        text = "".join(f"{tags[turn.speaker]}{turn.text}{eos_token}" for turn in turns)
        return f"{text}<|assistant|>{response.strip()}{eos_token}"
    raise ValueError(f"unknown reward-model input format {input_format!r}; use 'plain' or 'oasst'")


class RewardModelJudge(Judge):
    """Ranks each request's candidates by descending reward (no better response of its own).

    Args:
        model: path or hub name of the reward model (``None`` with ``config`` builds one from scratch).
        config: a transformers config as a dict with ``model_type`` (random init, seeded by ``seed``).
        tokenizer: tokenizer name; defaults to ``model``; ``"byt5"`` is the file-free offline tokenizer.
        input_format: ``"plain"`` or ``"oasst"`` (see the module docstring).
        sigmoid, scale: reported reward = scale * (sigmoid(logit) if sigmoid else logit); the paper's Table 1
            uses sigmoid and scale 100. Rankings do not depend on either.
        special_tokens: add the tokenizer's special tokens (an encoder's [CLS] ... [SEP]); decoder-only reward
            models read the text as formatted.
    """

    def __init__(
        self,
        model: str | None = None,
        config: dict[str, Any] | None = None,
        tokenizer: str | None = None,
        input_format: RewardFormat = "plain",
        sigmoid: bool = False,
        scale: float = 1.0,
        max_length: int = 512,
        batch_size: int = 16,
        seed: int = 0,
        dtype: str | None = None,
        special_tokens: bool = False,
    ) -> None:
        if model is None and config is None:
            raise ValueError("RewardModelJudge needs a model path or a config")
        if input_format not in ("plain", "oasst"):
            raise ValueError(f"unknown reward-model input format {input_format!r}; use 'plain' or 'oasst'")
        self.model_name = model
        self.input_format = input_format
        self.sigmoid = sigmoid
        self.scale = scale
        self.max_length = max_length
        self.batch_size = batch_size
        self.special_tokens = special_tokens
        self.model = self._load_model(model, config, seed, dtype).eval()
        self.model.requires_grad_(False)
        self.tokenizer = load_tokenizer(tokenizer or model or OFFLINE_TOKENIZER)
        self.tokenizer.truncation_side = "left"  # the reply is at the end: keep it, drop old turns
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.calls = 0

    sort_by_length = False

    def _load_model(
        self, model: str | None, config: dict[str, Any] | None, seed: int, dtype: str | None
    ) -> torch.nn.Module:
        """The scoring model: anything whose ``model(**encoding).logits[:, 0]`` is the reward."""
        return load_reward_model(model, config, seed=seed, dtype=dtype)

    @property
    def preferred_threshold(self) -> float:
        """The reward above which the model prefers a reply: logit 0 (probability 0.5), in reported units."""
        return 0.5 * self.scale if self.sigmoid else 0.0

    def to(self, device: Any) -> RewardModelJudge:
        self.model.to(device)
        return self

    def format_input(self, prompt: str, response: str) -> str:
        """The text the model reads for one (HH-format dialogue prompt, reply) pair."""
        return format_for_reward_model(prompt, response, self.input_format, self.tokenizer.eos_token or "")

    def batches(self, prompts: Sequence[str], responses: Sequence[str]) -> Iterator[tuple[list[int], Any]]:
        """(positions, encoding) per batch of (prompt, response) pairs, similar lengths batched together."""
        texts = [self.format_input(p, r) for p, r in zip(prompts, responses)]
        device = next(self.model.parameters()).device
        order = list(range(len(texts)))
        if self.sort_by_length:  # less padding (batch contents change: rewards may move in the last digits)
            order.sort(key=lambda i: len(texts[i]))
        for start in range(0, len(texts), self.batch_size):
            positions = order[start : start + self.batch_size]
            encoding = self.tokenizer(
                [texts[i] for i in positions],
                add_special_tokens=self.special_tokens,
                truncation=True,
                max_length=self.max_length,
                padding=True,
                return_tensors="pt",
            ).to(device)
            yield positions, encoding

    @torch.no_grad()
    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        """The reward of each (prompt, response) pair, batched."""
        rewards = [0.0] * len(prompts)
        for positions, encoding in self.batches(prompts, responses):
            logits = self.model(**encoding).logits[:, 0].float()
            values = torch.sigmoid(logits) if self.sigmoid else logits
            for i, value in zip(positions, (values * self.scale).tolist()):
                rewards[i] = value
        return rewards

    def rank(self, requests: Sequence[RankRequest]) -> list[Judgment]:
        self.calls += len(requests)
        prompts = [r.instruction for r in requests for _ in r.candidates]
        responses = [c for r in requests for c in r.candidates]
        flat = self.score(prompts, responses)
        judgments, offset = [], 0
        for request in requests:
            scores = tuple(flat[offset : offset + len(request.candidates)])
            offset += len(request.candidates)
            judgments.append(Judgment(ranking=rank_by_scores(scores), scores=scores))
        return judgments

    def metrics(self) -> dict[str, float]:
        return {"requests": float(self.calls)}

    def __repr__(self) -> str:
        return f"RewardModelJudge(model={self.model_name!r}, input_format={self.input_format!r})"
