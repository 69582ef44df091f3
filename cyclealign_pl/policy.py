"""The white box's token plumbing: prompts within their budget, sampled replies as exact token ids, scores.

Kept apart from the cycle so that the cycle reads as the method; why a reply is its token ids, how texts from
elsewhere are joined to their prompt, chat templates and prompt budgets: docs/whitebox.md.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor

from cyclealign_pl.data.rows import prompt_messages
from cyclealign_pl.reply_scoring import PromptEncoding, ReplyScorer, cache_rows, left_padded
from cyclealign_pl.settings import DEFAULT_LOGIT_CHUNK_ELEMENTS, PromptFormat

# A reply ends where the next dialogue turn would begin (HH-RLHF format): the cut for sampled candidates.
TURN_MARKERS = ("\n\nHuman:", "\n\nAssistant:", "\nHuman:", "\nAssistant:")
# PRO's evaluation (the paper's Table 1 protocol) cuts a generated reply at a speaker tag wherever it appears.
EVAL_MARKERS = ("Human:", "Assistant:")


@dataclass
class SamplingConfig:
    """How candidates are sampled from the white box (``transformers`` generate arguments).

    Attributes:
        max_new_tokens: the most tokens a sampled candidate may have, its EOS included; prompts keep
            ``max_length - max_new_tokens`` tokens.
        temperature: softmax temperature of sampling (> 0; 1 samples the model's own distribution).
        top_p: nucleus sampling: keep the smallest set of tokens whose probability reaches top_p (1: off).
        top_k: keep only the k most likely tokens (0: off).
        repetition_penalty: penalise tokens already generated (1: off).
    """

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
        if self.top_k < 0:
            raise ValueError(f"sampling.top_k must be >= 0, got {self.top_k}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"sampling.repetition_penalty must be > 0, got {self.repetition_penalty}")


def cut_at_next_turn(text: str, markers: Sequence[str] = TURN_MARKERS) -> str:
    """The reply up to the first of ``markers`` (the next dialogue turn), not stripped."""
    end = len(text)
    for marker in markers:
        found = text.find(marker)
        if found != -1:
            end = min(end, found)
    return text[:end]


@dataclass(frozen=True)
class Reply:
    """A reply as the white box scores it.

    Attributes:
        text: what the judge and the demonstrations show (decoded from ``ids``, stripped).
        ids: the token ids that are scored.
        finished: False when the reply was cut at the token budget (no EOS, no end of turn).
    """

    text: str
    ids: tuple[int, ...]
    finished: bool = True


@dataclass
class ScoredCandidates:
    """Mean response log-probs ``scores[B, C]`` (with grad) and the number of response tokens of each."""

    scores: Tensor
    lengths: Tensor
    encoding: PromptEncoding | None = None  # shared-prefix scoring keeps the prompts' encoding
    prompt_lengths: list[int] = field(default_factory=list)  # token counts of the (truncated) prompts


class WhiteBox:
    """Wraps a causal LM and its tokenizer with what the cycle needs: sample, score, greedy.

    ``shared_prefix``: continue candidates from each prompt's key/value cache (same results, less time and
    memory). ``prompt_format``: ``chat`` (the tokenizer's chat template), ``dialogue`` (HH-RLHF text, base
    models) or ``auto``. Both are explained in docs/whitebox.md.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer,
        max_length: int = 512,
        sampling: SamplingConfig | None = None,
        shared_prefix: bool = True,
        logit_chunk_elements: int | None = DEFAULT_LOGIT_CHUNK_ELEMENTS,
        prompt_format: PromptFormat = "auto",
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.sampling = sampling or SamplingConfig()
        self.shared_prefix = shared_prefix
        self.logit_chunk_elements = logit_chunk_elements
        if self.max_length <= self.sampling.max_new_tokens:
            raise ValueError(
                f"max_length={max_length} leaves no room for a prompt: it must exceed "
                f"sampling.max_new_tokens={self.sampling.max_new_tokens}"
            )
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.pad_id: int = tokenizer.pad_token_id
        self.chat = resolve_prompt_format(tokenizer, prompt_format) == "chat"
        # the token that ends a reply: the end of the assistant's turn (chat), else EOS
        self.eos_id: int = end_of_turn_id(tokenizer) if self.chat else tokenizer.eos_token_id
        # generation stops at any of these (a chat model may also end with its EOS)
        self.stop_ids: tuple[int, ...] = tuple(
            dict.fromkeys(i for i in (self.eos_id, tokenizer.eos_token_id) if i is not None)
        )
        # a chat template writes its own BOS where the model wants one
        self.bos_id: int | None = None if self.chat else getattr(tokenizer, "bos_token_id", None)
        self._token_cache: dict[str, list[int]] = {}

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # -- tokenisation -------------------------------------------------------------------------------
    def prompt_budget(self, reply_room: int | None = None) -> int:
        """How many tokens a prompt keeps (BOS included) when its reply may take ``reply_room`` tokens
        (default: ``sampling.max_new_tokens``)."""
        room = self.sampling.max_new_tokens if reply_room is None else reply_room
        budget = self.max_length - room
        if budget < 1:
            raise ValueError(
                f"max_length={self.max_length} leaves no room for a prompt of a {room}-token reply"
            )
        return budget

    def _tokens(self, prompt: str) -> list[int]:
        """The prompt's token ids, remembered: a prompt in flight is sampled and scored every round."""
        ids = self._token_cache.get(prompt)
        if ids is None:
            if len(self._token_cache) >= 4096:
                self._token_cache.clear()
            text = self._chat_text(prompt_messages(prompt), generation_prompt=True) if self.chat else prompt
            ids = self._token_cache[prompt] = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return ids

    def _chat_text(self, messages: list[dict[str, str]], generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=generation_prompt
        )

    def prompt_ids(self, prompt: str, reply_room: int | None = None) -> list[int]:
        """Prompt token ids (BOS first when the tokenizer has one), keeping the last tokens that fit."""
        ids = self._tokens(prompt)
        prefix = [self.bos_id] if self.bos_id is not None else []
        keep = max(self.prompt_budget(reply_room) - len(prefix), 1)
        return prefix + ids[-keep:]

    def prompt_overflow(self, prompt: str, reply_room: int | None = None) -> int:
        """How many of the prompt's first tokens :meth:`prompt_ids` drops to leave room for the reply
        (0: none)."""
        keep = max(self.prompt_budget(reply_room) - (self.bos_id is not None), 1)
        return max(len(self._tokens(prompt)) - keep, 0)

    def visible_prompt(self, prompt: str) -> str:
        """The prompt as the white box sees it: whole, or the text of its last tokens when it is longer than
        the budget. The judge is shown this too: a 20k-word prompt is not sent whole on every request."""
        overflow = self.prompt_overflow(prompt)
        if not overflow:
            return prompt
        return self.tokenizer.decode(self._tokens(prompt)[overflow:], skip_special_tokens=True)

    def reply_token_ids(self, prompt: str, text: str) -> list[int]:
        """The token ids of ``text`` as the reply to ``prompt`` (its end-of-turn not included): joined as
        ``prompt + " " + text`` (the dialogue format) and tokenised together, so the boundary tokens are the
        ones the model would have produced; a chat model's as the template renders the assistant's message."""
        text = text.strip()
        if self.chat:
            return self._chat_reply_ids(prompt, text)
        # the join only depends on the last characters: skip tokenising the whole dialogue
        context = prompt[-64:]
        head = self.tokenizer(context, add_special_tokens=False)["input_ids"]
        joined = self.tokenizer(f"{context} {text}", add_special_tokens=False)["input_ids"]
        if joined[: len(head)] == head:
            return joined[len(head) :]
        return self.tokenizer(f" {text}", add_special_tokens=False)["input_ids"]  # a merge across the join

    def _chat_reply_ids(self, prompt: str, text: str) -> list[int]:
        """The tokens the template renders between the generation prompt and the end of the assistant's
        turn, tokenised with the whole dialogue (as the prompt is), so no boundary token differs."""
        messages = prompt_messages(prompt)
        head = self._tokens(prompt)
        full = self.tokenizer(
            self._chat_text([*messages, {"role": "assistant", "content": text}], generation_prompt=False),
            add_special_tokens=False,
        )["input_ids"]
        if full[: len(head)] == head and self.eos_id in full[len(head) :]:
            tail = full[len(head) :]
            return tail[: tail.index(self.eos_id)]
        # a template that renders the last assistant message differently (drops reasoning): the text alone
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def reply_from_text(self, prompt: str, text: str, room: int) -> Reply:
        """A reply written elsewhere (the judge's better reply) as the white box scores it: cut at the next
        dialogue turn, joined to its prompt, then EOS when it fits in ``room`` tokens; cut there (no EOS,
        ``finished=False``) when it does not."""
        ids = self.reply_token_ids(prompt, cut_at_next_turn(text))
        if len(ids) + 1 <= room:
            return Reply(text=self._decode(ids).strip(), ids=(*ids, self.eos_id), finished=True)
        ids = ids[: max(room, 1)]
        return Reply(text=self._decode(ids).strip(), ids=tuple(ids), finished=False)

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    # -- generation ---------------------------------------------------------------------------------
    @torch.no_grad()
    def _generate(
        self, prompts: Sequence[str], max_new_tokens: int, copies: int, **kwargs
    ) -> list[list[int]]:
        """The generated token ids of ``copies`` continuations per prompt (padding after EOS included)."""
        input_ids, attention_mask = left_padded(
            [self.prompt_ids(p, max_new_tokens) for p in prompts], self.pad_id, self.device
        )
        was_training = self.model.training
        self.model.eval()
        try:
            if self.shared_prefix and copies > 1 and input_ids.shape[1] > 1:
                input_ids, attention_mask, kwargs["cache"] = self._prefill(input_ids, attention_mask, copies)
                copies = 1
            output = self.model.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                max_new_tokens=max_new_tokens,
                num_return_sequences=copies,
                pad_token_id=self.pad_id,
                eos_token_id=list(self.stop_ids),
                use_cache=True,
                **kwargs,
            )
        finally:
            self.model.train(was_training)
        return output[:, input_ids.shape[1] :].tolist()

    def _prefill(self, input_ids: Tensor, attention_mask: Tensor, copies: int) -> tuple[Tensor, Tensor, Any]:
        """Encode each prompt once (all but its last token) and repeat the cache ``copies`` times, so that
        ``generate`` samples every copy without encoding the prompt again: the inputs repeated, and the
        cache."""
        positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        prefix = self.model(
            input_ids=input_ids[:, :-1],
            attention_mask=attention_mask[:, :-1],
            position_ids=positions[:, :-1],
            use_cache=True,
            logits_to_keep=1,
        )
        rows = torch.arange(input_ids.shape[0], device=input_ids.device).repeat_interleave(copies)
        return input_ids[rows], attention_mask[rows], cache_rows(prefix.cache, rows)

    def _reply_from_generated(self, generated: list[int], markers: Sequence[str] = TURN_MARKERS) -> Reply:
        """The reply in one generated sequence: up to and including its EOS (a chat model's end of turn), or
        up to the next dialogue turn."""
        stop = next((k for k, token in enumerate(generated) if token in self.stop_ids), None)
        if stop is not None:
            ids = generated[: stop + 1]
            body, finished = ids[:-1], True
        else:
            ids, body, finished = generated, generated, False
        text = self._decode(body)
        if self.chat:  # the turn ends at its token: a chat reply's own "Human:" is text, not a new turn
            return Reply(text=text.strip(), ids=tuple(ids), finished=finished)
        cut = cut_at_next_turn(text, markers)
        if len(cut) == len(text):
            return Reply(text=text.strip(), ids=tuple(ids), finished=finished)
        keep = _tokens_before(body, cut, self._decode)  # the turn ended the reply: that is a finished reply
        if keep == 0:  # the first token starts the next turn: the decision to end an empty reply, as EOS is
            return Reply(text="", ids=tuple(body[:1]), finished=True)
        return Reply(text=self._decode(body[:keep]).strip(), ids=tuple(body[:keep]), finished=True)

    def sample(self, prompts: Sequence[str], num_candidates: int) -> list[list[Reply]]:
        """``num_candidates`` sampled replies per prompt, all prompts in one ``generate`` call."""
        s = self.sampling
        generated = self._generate(
            prompts,
            s.max_new_tokens,
            num_candidates,
            do_sample=True,
            temperature=s.temperature,
            top_p=s.top_p,
            top_k=s.top_k,
            repetition_penalty=s.repetition_penalty,
        )
        replies = [self._reply_from_generated(ids) for ids in generated]
        return [replies[i * num_candidates : (i + 1) * num_candidates] for i in range(len(prompts))]

    def greedy(
        self, prompts: Sequence[str], max_new_tokens: int, markers: Sequence[str] = EVAL_MARKERS
    ) -> list[str]:
        """One greedy reply per prompt (evaluation): up to the end of turn (chat), or cut at a speaker tag as
        PRO's evaluation does (dialogue)."""
        generated = self._generate(prompts, max_new_tokens, 1, do_sample=False)
        return [self._reply_from_generated(ids, markers).text for ids in generated]

    # -- scoring ------------------------------------------------------------------------------------
    def score(self, prompts: Sequence[str], replies: Sequence[Sequence[Reply]]) -> ScoredCandidates:
        """Mean token log-prob of every reply given its prompt, all pairs in one forward pass.

        Returns ``scores[B, C]`` where C = ``len(replies[b])`` (equal for every prompt). Gradients flow.
        With ``shared_prefix`` each prompt is encoded once (``encoding`` keeps it for :meth:`score_more`).
        """
        num_prompts, num_candidates = len(prompts), len(replies[0])
        if any(len(r) != num_candidates for r in replies):
            raise ValueError("every prompt must have the same number of replies to score")
        prompt_ids = [self.prompt_ids(p) for p in prompts]
        flat = [reply.ids for group in replies for reply in group]
        if self.shared_prefix and not self._checkpointing():
            encoding = self.encode_prompts(prompt_ids)
            rows = torch.arange(num_prompts, device=self.device).repeat_interleave(num_candidates)
            scores, lengths = self._scorer().on_prompts(encoding, rows, flat)
        else:
            encoding = None
            repeated = [ids for ids in prompt_ids for _ in range(num_candidates)]
            scores, lengths = self._scorer().full_sequences(repeated, flat)
        return ScoredCandidates(
            scores=scores.view(num_prompts, num_candidates),
            lengths=lengths.view(num_prompts, num_candidates),
            encoding=encoding,
            prompt_lengths=[len(ids) for ids in prompt_ids],
        )

    def score_more(
        self, scored: ScoredCandidates, prompts: Sequence[str], rows: Sequence[int], replies: Sequence[Reply]
    ) -> Tensor:
        """Mean token log-prob of ``replies[k]`` given prompt ``rows[k]`` of an earlier :meth:`score` call
        (on its prompt encoding when it kept one); gradients flow."""
        if scored.encoding is not None:
            index = torch.tensor(list(rows), dtype=torch.long, device=self.device)
            return self._scorer().on_prompts(scored.encoding, index, [r.ids for r in replies])[0]
        prompt_ids = [self.prompt_ids(prompts[row]) for row in rows]
        return self._scorer().full_sequences(prompt_ids, [r.ids for r in replies])[0]

    def reply_room(self, scored: ScoredCandidates, row: int) -> int:
        """Tokens left for a reply to prompt ``row`` of ``scored``: what ``max_length`` allows after it."""
        return self.max_length - scored.prompt_lengths[row]

    def _checkpointing(self) -> bool:
        """Gradient checkpointing drops the key/value cache in training, so the shared prefix cannot be
        used."""
        return self.model.training and any(
            getattr(m, "gradient_checkpointing", False) for m in self.model.modules()
        )

    def encode_prompts(self, prompt_ids: Sequence[list[int]]) -> PromptEncoding:
        """The prompts left-padded [B, P] through the decoder once, with ``use_cache`` (gradients kept)."""
        return self._scorer().encode_prompts(prompt_ids)

    def _scorer(self) -> ReplyScorer:
        return ReplyScorer(self.model, self.pad_id, self.logit_chunk_elements)


def resolve_prompt_format(tokenizer, prompt_format: PromptFormat) -> Literal["chat", "dialogue"]:
    """``auto``: ``chat`` when the tokenizer has a chat template, else ``dialogue``; ``chat`` needs one."""
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if prompt_format == "auto":
        return "chat" if has_template else "dialogue"
    if prompt_format == "chat" and not has_template:
        raise ValueError(
            "prompt_format='chat' needs a tokenizer with a chat template; this one has none (a base model: "
            "use prompt_format 'dialogue' or 'auto')"
        )
    if prompt_format not in ("chat", "dialogue"):
        raise ValueError(f"prompt_format must be 'auto', 'chat' or 'dialogue', got {prompt_format!r}")
    return prompt_format


def end_of_turn_id(tokenizer) -> int:
    """The token a chat template puts right after the assistant's message (``<|im_end|>``, ``<|eot_id|>``,
    ``<end_of_turn>``): where the model ends a reply. The tokenizer's EOS when the template writes none."""
    marker = "CYCLEALIGN_REPLY_END_MARKER"
    try:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": marker}], tokenize=False
        )
    except Exception:  # a template that refuses this dialogue: fall back to EOS
        text = ""
    after = text[text.find(marker) + len(marker) :] if marker in text else ""
    ids = tokenizer(after, add_special_tokens=False)["input_ids"] if after else []
    special = set(tokenizer.all_special_ids) | {
        i for i, token in getattr(tokenizer, "added_tokens_decoder", {}).items() if token.special
    }
    if ids and ids[0] in special:
        return ids[0]
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has neither an end-of-turn token in its chat template nor an EOS")
    return tokenizer.eos_token_id


def _tokens_before(ids: Sequence[int], cut: str, decode: Callable[[Sequence[int]], str]) -> int:
    """How many of ``ids`` make up the text ``cut`` (a reply cut where the next turn starts).

    The longest prefix that decodes to ``cut`` plus at most whitespace (``"Sure.\\n\\n"`` before
    ``"Human:"``), or to a part of ``cut`` when the cut falls inside a token.
    """
    within = 0
    for count in range(1, len(ids) + 1):
        text = decode(ids[:count])
        if cut.startswith(text) or (text.startswith(cut) and not text[len(cut) :].strip()):
            within = count
        else:
            break
    return within
