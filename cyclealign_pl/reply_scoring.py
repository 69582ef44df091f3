"""The forward passes that score replies by their mean log-prob, apart from the white box's token plumbing.

Only the reply positions go through the output head, a chunk at a time, so memory grows neither with the
vocabulary times the sequence nor with the number of replies (docs/scaling.md, section 2).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from cyclealign_pl.objective import mean_response_logprob, target_logprobs


@dataclass
class PromptEncoding:
    """Prompts encoded once with gradients (key/value cache, attention mask, last hidden state): replies are
    scored on top of it, the candidates and later the judge's better replies of the same iteration."""

    cache: Any
    mask: Tensor  # [B, P], left padded
    last_hidden: Tensor  # [B, 1, H]: it predicts a reply's first token


def left_padded(sequences: Sequence[list[int]], pad_id: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """Token ids [B, width] padded on the left and their 0/1 attention mask."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, width - len(seq) :] = torch.tensor(seq, dtype=torch.long)
        mask[row, width - len(seq) :] = 1
    return ids.to(device), mask.to(device)


def right_padded(
    replies: Sequence[Sequence[int]], pad_id: int, device: torch.device
) -> tuple[Tensor, Tensor]:
    """Token ids [K, width] padded on the right and their boolean mask; an empty reply is an error."""
    if any(len(r) == 0 for r in replies):
        raise ValueError("a reply to score has no tokens")
    width = max(len(r) for r in replies)
    ids = torch.full((len(replies), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids, dtype=torch.bool)
    for row, reply in enumerate(replies):
        ids[row, : len(reply)] = torch.tensor(reply, dtype=torch.long)
        mask[row, : len(reply)] = True
    return ids.to(device), mask.to(device)


def cache_rows(cache: Any, rows: Tensor) -> Any:
    """A new key/value cache holding ``cache``'s batch rows ``rows`` (repeats allowed); ``cache`` is
    unchanged, and the new one's tensors stay in the autograd graph (indexing, not copies of the data without
    history)."""
    view = copy.copy(cache)
    view.layers = [copy.copy(layer) for layer in cache.layers]
    view.batch_select_indices(rows)
    return view


def output_head(model: torch.nn.Module) -> Callable[[Tensor], Tensor]:
    """The output head as the causal LM applies it, including the logit scaling a few families add."""
    head = model.get_output_embeddings()
    config = getattr(model, "config", None)
    softcap = getattr(config, "final_logit_softcapping", None)  # Gemma 2/3
    scale = getattr(config, "logit_scale", None)  # Cohere
    divide = getattr(config, "logits_scaling", None)  # Granite
    if not (softcap or scale or divide):
        return head

    def scaled(hidden: Tensor) -> Tensor:
        logits = head(hidden)
        if scale:
            logits = logits * scale
        if divide:
            logits = logits / divide
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        return logits

    return scaled


@dataclass(frozen=True)
class ReplyScorer:
    """One causal LM's scoring passes: the decoder's hidden states, then the head on reply positions only.

    Attributes:
        model: the causal LM (hidden states from ``get_decoder()``, the head ``get_output_embeddings()``).
        pad_id: the token that pads.
        logit_chunk_elements: logits computed at once (None: all of them).
    """

    model: torch.nn.Module
    pad_id: int
    logit_chunk_elements: int | None

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def encode_prompts(self, prompt_ids: Sequence[list[int]]) -> PromptEncoding:
        """The prompts left-padded [B, P] through the decoder once, with ``use_cache`` (gradients kept)."""
        ids, mask = left_padded(prompt_ids, self.pad_id, self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        out = self.model.get_decoder()(
            input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True
        )
        return PromptEncoding(cache=out.cache, mask=mask, last_hidden=out.last_hidden_state[:, -1:])

    def on_prompts(
        self, encoding: PromptEncoding, rows: Tensor, replies: Sequence[Sequence[int]]
    ) -> tuple[Tensor, Tensor]:
        """Replies right-padded [K, R] on top of the prompts' cache rows ``rows`` (explicit positions, so the
        prompts' left padding shifts nothing); the first reply token is predicted by the prompt's last
        state. Returns the mean log-probs [K] and the reply lengths [K]."""
        device = self.device
        ids, reply_mask = right_padded(replies, self.pad_id, device)
        prompt_mask = encoding.mask[rows]
        positions = prompt_mask.sum(-1, keepdim=True) + torch.arange(ids.shape[1], device=device)
        attention = torch.cat([prompt_mask, reply_mask.long()], dim=1)
        hidden = self.model.get_decoder()(
            input_ids=ids,
            attention_mask=attention,
            position_ids=positions,
            cache=cache_rows(encoding.cache, rows),
            use_cache=True,
        ).last_hidden_state
        # state t-1 predicts token t
        predictors = torch.cat([encoding.last_hidden[rows], hidden[:, :-1]], dim=1)
        return self.mean_logprob(predictors, ids, reply_mask), reply_mask.sum(-1)

    def full_sequences(
        self, prompt_ids: Sequence[list[int]], replies: Sequence[Sequence[int]]
    ) -> tuple[Tensor, Tensor]:
        """Whole sequences ``prompt + reply`` right-padded; only the reply positions go through the head."""
        device = self.device
        sequences = [list(p) + list(r) for p, r in zip(prompt_ids, replies)]
        ids, attention = right_padded(sequences, self.pad_id, device)
        hidden = self.model.get_decoder()(
            input_ids=ids, attention_mask=attention.long(), use_cache=False
        ).last_hidden_state
        reply_ids, reply_mask = right_padded(replies, self.pad_id, device)
        starts = torch.tensor([len(p) for p in prompt_ids], device=device)
        # the state at position start-1+j predicts reply token j (positions past a reply's end are masked)
        index = (starts[:, None] - 1 + torch.arange(reply_ids.shape[1], device=device)).clamp(
            max=ids.shape[1] - 1
        )
        predictors = hidden.gather(1, index[..., None].expand(-1, -1, hidden.shape[-1]))
        return self.mean_logprob(predictors, reply_ids, reply_mask), reply_mask.sum(-1)

    def mean_logprob(self, predictors: Tensor, targets: Tensor, mask: Tensor) -> Tensor:
        """Mean log-prob of ``targets`` under the head applied to ``predictors``, a chunk of positions at a
        time."""
        vocab = self.model.get_output_embeddings().weight.shape[0]
        chunk = None
        if self.logit_chunk_elements:
            chunk = max(1, self.logit_chunk_elements // vocab)  # (reply, token) positions of V logits each
        return mean_response_logprob(
            target_logprobs(predictors, output_head(self.model), targets, chunk), mask
        )
