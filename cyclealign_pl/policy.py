"""The white-box side of the cycle: tokenisation, sampling candidates, scoring them by mean log-prob.

Kept apart from the cycle so that the cycle reads as the method and this file holds the token plumbing.
Conventions (as in the RRHF/PRO reference code): the prompt and each response are tokenised separately;
a response is followed by exactly one EOS, which counts as a response token; prompts longer than the budget
keep their *last* tokens (the most recent turns), responses are cut at ``max_new_tokens``.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from cyclealign_pl.objective import mean_response_logprob, token_logprobs

# A reply ends where the next dialogue turn would begin (HH-RLHF format).
TURN_MARKERS = ("\n\nHuman:", "\n\nAssistant:", "\nHuman:", "\nAssistant:")


@dataclass
class SamplingConfig:
    """How candidates are sampled from the white-box (``transformers`` generate arguments)."""

    max_new_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"sampling.max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature <= 0:
            raise ValueError(f"sampling.temperature must be > 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"sampling.top_p must be in (0, 1], got {self.top_p}")


def cut_at_next_turn(text: str) -> str:
    """The reply up to the next ``Human:``/``Assistant:`` turn, stripped."""
    end = len(text)
    for marker in TURN_MARKERS:
        found = text.find(marker)
        if found != -1:
            end = min(end, found)
    return text[:end].strip()


@dataclass
class PromptEncoding:
    """Prompts encoded once with gradients (key/value cache, attention mask, last logits): more replies can be
    scored on top of it later in the same step, e.g. the judge's better responses."""

    cache: Any
    mask: Tensor  # [B, P], left padded
    last_logits: Tensor  # [B, 1, V]: they predict a reply's first token


@dataclass
class ScoredCandidates:
    """Mean response log-probs ``scores[B, C]`` (with grad) and the number of response tokens of each."""

    scores: Tensor
    lengths: Tensor
    prompts: PromptEncoding | None = None  # set by shared-prefix scoring


class WhiteBox:
    """Wraps a causal LM and its tokenizer with the three things the cycle needs: sample, score, greedy.

    ``shared_prefix``: encode each prompt once and continue its candidates from the prompt's key/value cache,
    both when sampling them (no gradients) and when scoring them (gradients flow through the cache), instead of
    one full sequence per candidate; same results, less time and memory (docs/scaling.md). Scoring falls back
    to full sequences under gradient checkpointing, which drops the cache in training.
    """

    def __init__(self, model: torch.nn.Module, tokenizer, max_length: int = 512, shared_prefix: bool = True) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.shared_prefix = shared_prefix
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.pad_id: int = tokenizer.pad_token_id
        self.eos_id: int = tokenizer.eos_token_id
        self.bos_id: int | None = getattr(tokenizer, "bos_token_id", None)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # -- tokenisation -------------------------------------------------------------------------------
    def prompt_ids(self, prompt: str, budget: int) -> list[int]:
        """Prompt token ids (BOS first when the tokenizer has one), keeping the last ``budget`` tokens."""
        ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        prefix = [self.bos_id] if self.bos_id is not None else []
        keep = max(budget - len(prefix), 1)
        return prefix + ids[-keep:]

    def prompt_overflow(self, prompt: str, max_new_tokens: int) -> int:
        """How many of the prompt's first tokens :meth:`prompt_ids` drops to leave room for the reply (0: none)."""
        keep = max(self.max_length - max_new_tokens - 1 - (self.bos_id is not None), 1)
        return max(len(self.tokenizer(prompt, add_special_tokens=False)["input_ids"]) - keep, 0)

    def response_ids(self, response: str, max_tokens: int) -> list[int]:
        """Response token ids cut to ``max_tokens``, then exactly one EOS."""
        ids = self.tokenizer(response, add_special_tokens=False)["input_ids"][:max_tokens]
        return ids + [self.eos_id]

    def _left_padded(self, sequences: Sequence[list[int]]) -> tuple[Tensor, Tensor]:
        width = max(len(s) for s in sequences)
        ids = torch.full((len(sequences), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(sequences), width), dtype=torch.long)
        for row, seq in enumerate(sequences):
            ids[row, width - len(seq) :] = torch.tensor(seq, dtype=torch.long)
            mask[row, width - len(seq) :] = 1
        return ids.to(self.device), mask.to(self.device)

    # -- generation ---------------------------------------------------------------------------------
    @torch.no_grad()
    def _generate(self, prompts: Sequence[str], max_new_tokens: int, num_return_sequences: int, **kwargs) -> list[str]:
        budget = self.max_length - max_new_tokens - 1
        if budget < 1:
            raise ValueError(f"max_length={self.max_length} leaves no room for a prompt of max_new_tokens={max_new_tokens}")
        input_ids, attention_mask = self._left_padded([self.prompt_ids(p, budget) for p in prompts])
        was_training = self.model.training
        self.model.eval()
        try:
            if self.shared_prefix and num_return_sequences > 1 and input_ids.shape[1] > 1:
                input_ids, attention_mask, kwargs["cache"] = self._prefill(input_ids, attention_mask, num_return_sequences)
                num_return_sequences = 1
            output = self.model.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                max_new_tokens=max_new_tokens,
                num_return_sequences=num_return_sequences,
                pad_token_id=self.pad_id,
                eos_token_id=self.eos_id,
                use_cache=True,
                **kwargs,
            )
        finally:
            self.model.train(was_training)
        texts = self.tokenizer.batch_decode(output[:, input_ids.shape[1] :], skip_special_tokens=True)
        return [cut_at_next_turn(t) for t in texts]

    def _prefill(self, input_ids: Tensor, attention_mask: Tensor, copies: int) -> tuple[Tensor, Tensor, Any]:
        """Encode each prompt once (all but its last token) and repeat the cache ``copies`` times, so that
        ``generate`` samples every copy without encoding the prompt again: the inputs repeated, and the cache."""
        positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        prefix = self.model(input_ids=input_ids[:, :-1], attention_mask=attention_mask[:, :-1],
                            position_ids=positions[:, :-1], use_cache=True, logits_to_keep=1)
        rows = torch.arange(input_ids.shape[0], device=input_ids.device).repeat_interleave(copies)
        return input_ids[rows], attention_mask[rows], _cache_rows(prefix.cache, rows)

    def sample(self, prompts: Sequence[str], num_candidates: int, sampling: SamplingConfig) -> list[list[str]]:
        """``num_candidates`` sampled replies per prompt, all prompts in one ``generate`` call."""
        texts = self._generate(
            prompts,
            sampling.max_new_tokens,
            num_candidates,
            do_sample=True,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            top_k=sampling.top_k,
            repetition_penalty=sampling.repetition_penalty,
        )
        return [texts[i * num_candidates : (i + 1) * num_candidates] for i in range(len(prompts))]

    def greedy(self, prompts: Sequence[str], max_new_tokens: int) -> list[str]:
        """One greedy reply per prompt (evaluation)."""
        return self._generate(prompts, max_new_tokens, 1, do_sample=False)

    # -- scoring ------------------------------------------------------------------------------------
    def score(self, prompts: Sequence[str], responses: Sequence[Sequence[str]], max_new_tokens: int) -> ScoredCandidates:
        """Mean token log-prob of every response given its prompt, in one forward pass over all pairs.

        Returns ``scores[B, C]`` where C = ``len(responses[b])`` (equal for every prompt). Gradients flow.
        With ``shared_prefix`` each prompt is encoded once (``scores.prompts`` keeps that encoding).
        """
        num_prompts, num_candidates = len(prompts), len(responses[0])
        if any(len(r) != num_candidates for r in responses):
            raise ValueError("every prompt must have the same number of responses to score")
        if self.shared_prefix and not self._checkpointing():
            return self._score_shared_prefix(prompts, responses, max_new_tokens)
        budget = self.max_length - max_new_tokens - 1
        sequences: list[list[int]] = []
        starts: list[int] = []
        for prompt, group in zip(prompts, responses):
            p_ids = self.prompt_ids(prompt, budget)
            for response in group:
                sequences.append(p_ids + self.response_ids(response, max_new_tokens))
                starts.append(len(p_ids))
        width = max(len(s) for s in sequences)
        ids = torch.full((len(sequences), width), self.pad_id, dtype=torch.long)
        attention = torch.zeros_like(ids)
        response_mask = torch.zeros_like(ids, dtype=torch.bool)
        for row, (seq, start) in enumerate(zip(sequences, starts)):  # right padding
            ids[row, : len(seq)] = torch.tensor(seq)
            attention[row, : len(seq)] = 1
            response_mask[row, start : len(seq)] = True
        ids, attention, response_mask = ids.to(self.device), attention.to(self.device), response_mask.to(self.device)
        logits = self.model(input_ids=ids, attention_mask=attention, use_cache=False).logits
        scores = mean_response_logprob(token_logprobs(logits, ids), response_mask)
        return ScoredCandidates(
            scores=scores.view(num_prompts, num_candidates),
            lengths=response_mask.sum(-1).view(num_prompts, num_candidates),
        )

    def _checkpointing(self) -> bool:
        """Gradient checkpointing drops the key/value cache in training, so the shared prefix cannot be used."""
        return self.model.training and any(getattr(m, "gradient_checkpointing", False) for m in self.model.modules())

    def _score_shared_prefix(
        self, prompts: Sequence[str], responses: Sequence[Sequence[str]], max_new_tokens: int
    ) -> ScoredCandidates:
        """:meth:`score` with each prompt encoded once (:meth:`encode_prompts`), the candidates on top."""
        encoding = self.encode_prompts(prompts, max_new_tokens)
        num_prompts, num_candidates = len(prompts), len(responses[0])
        rows = torch.arange(num_prompts, device=self.device).repeat_interleave(num_candidates)
        scores, lengths = self._score_on(encoding, rows, [r for group in responses for r in group], max_new_tokens)
        return ScoredCandidates(
            scores=scores.view(num_prompts, num_candidates),
            lengths=lengths.view(num_prompts, num_candidates),
            prompts=encoding,
        )

    def encode_prompts(self, prompts: Sequence[str], max_new_tokens: int) -> PromptEncoding:
        """The prompts left-padded [B, P] through the model once, with ``use_cache`` (gradients kept)."""
        budget = self.max_length - max_new_tokens - 1
        ids, mask = self._left_padded([self.prompt_ids(p, budget) for p in prompts])
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1)
        return PromptEncoding(cache=out.cache, mask=mask, last_logits=out.logits[:, -1:])

    def score_on(self, encoding: PromptEncoding, rows: Sequence[int], responses: Sequence[str], max_new_tokens: int) -> Tensor:
        """Mean token log-prob of ``responses[k]`` given the encoded prompt ``rows[k]`` (gradients flow)."""
        index = torch.tensor(list(rows), dtype=torch.long, device=self.device)
        return self._score_on(encoding, index, responses, max_new_tokens)[0]

    def _score_on(self, encoding: PromptEncoding, rows: Tensor, responses: Sequence[str], max_new_tokens: int) -> tuple[Tensor, Tensor]:
        """Replies right-padded [K, R] on top of the prompts' cache rows ``rows`` (explicit positions, so the
        prompts' left padding shifts nothing); the first reply token is predicted by the prompt's last logits."""
        replies = [self.response_ids(r, max_new_tokens) for r in responses]
        width = max(len(r) for r in replies)
        ids = torch.full((len(replies), width), self.pad_id, dtype=torch.long)
        response_mask = torch.zeros_like(ids, dtype=torch.bool)
        for row, reply in enumerate(replies):  # right padding
            ids[row, : len(reply)] = torch.tensor(reply)
            response_mask[row, : len(reply)] = True
        ids, response_mask = ids.to(self.device), response_mask.to(self.device)
        prompt_mask = encoding.mask[rows]
        positions = prompt_mask.sum(-1, keepdim=True) + torch.arange(width, device=self.device)
        attention = torch.cat([prompt_mask, response_mask.long()], dim=1)
        logits = self.model(input_ids=ids, attention_mask=attention, position_ids=positions,
                            cache=_cache_rows(encoding.cache, rows), use_cache=True).logits
        # [last prompt logits, reply logits] predict [reply tokens]: token_logprobs shifts by one
        logits = torch.cat([encoding.last_logits[rows], logits], dim=1)
        ids = torch.nn.functional.pad(ids, (1, 0), value=self.pad_id)
        response_mask = torch.nn.functional.pad(response_mask, (1, 0), value=False)
        return mean_response_logprob(token_logprobs(logits, ids), response_mask), response_mask.sum(-1)


def _cache_rows(cache: Any, rows: Tensor) -> Any:
    """A new key/value cache holding ``cache``'s batch rows ``rows`` (repeats allowed); ``cache`` is unchanged,
    and the new one's tensors stay in the autograd graph (indexing, not copies of the data without history)."""
    view = copy.copy(cache)
    view.layers = [copy.copy(layer) for layer in cache.layers]
    view.batch_select_indices(rows)
    return view
