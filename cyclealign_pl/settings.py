"""The module's grouped settings, beside ``CycleConfig`` (cycle.py) and ``SamplingConfig`` (policy.py).

Each group is one YAML mapping under ``model:`` (``model.whitebox.max_length``,
``model.evaluation.max_new_tokens``), checked when it is built: a bad value is one line before any model
loads.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

# the most logits one scoring chunk holds (64 MB in float32; recomputed in backward): docs/scaling.md
DEFAULT_LOGIT_CHUNK_ELEMENTS = 2**24

PromptFormat = Literal["auto", "chat", "dialogue"]


@dataclass(frozen=True)
class WhiteBoxConfig:
    """How the white box holds prompts and replies in memory.

    Attributes:
        max_length: prompt + reply token budget (paper: 512); longer prompts keep their last tokens.
        prompt_format: ``chat``: the tokenizer's chat template, replies end at its end-of-turn token;
            ``dialogue``: the HH-RLHF ``Human:``/``Assistant:`` text (base models, the paper's LLaMA);
            ``auto``: ``chat`` when the tokenizer has a template.
        shared_prefix: score a prompt's candidates from one encoding of the prompt (KV cache): same scores,
            less time and memory (docs/scaling.md); full sequences under gradient checkpointing.
        logit_chunk_elements: the most logits one scoring chunk holds (null: all at once).
        gradient_checkpointing: trade compute for activation memory on large white boxes.
        lora: train LoRA adapters only, e.g. ``{r: 16, lora_alpha: 32}`` (``peft.LoraConfig``; the ``lora``
            extra); exports merge them.
    """

    max_length: int = 512
    prompt_format: PromptFormat = "auto"
    shared_prefix: bool = True
    logit_chunk_elements: int | None = DEFAULT_LOGIT_CHUNK_ELEMENTS
    gradient_checkpointing: bool = False
    lora: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if self.max_length < 2:
            raise ValueError(f"whitebox.max_length must be >= 2, got {self.max_length}")
        if self.prompt_format not in ("auto", "chat", "dialogue"):
            raise ValueError(
                f"whitebox.prompt_format must be auto, chat or dialogue, got {self.prompt_format!r}"
            )
        if self.logit_chunk_elements is not None and self.logit_chunk_elements < 1:
            raise ValueError(
                f"whitebox.logit_chunk_elements must be >= 1 or null, got {self.logit_chunk_elements}"
            )

    def check_room(self, name: str, new_tokens: int) -> None:
        """A reply of ``new_tokens`` must leave room for a prompt."""
        if self.max_length <= new_tokens:
            raise ValueError(
                f"whitebox.max_length={self.max_length} leaves no room for a prompt: it must exceed "
                f"{name}={new_tokens}"
            )


@dataclass(frozen=True)
class EvaluationConfig:
    """How ``validate``/``test``/``predict`` (and the zero-shot evaluation of a fit) generate and warn.

    Attributes:
        max_new_tokens: greedy reply length (paper: 128).
        collapse_max_empty_share: warn that the replies collapsed above this share of empty replies...
        collapse_min_distinct_2: ...or below this distinct-2 (distinct word bigrams / all bigrams)...
        collapse_max_looping_share: ...or above this share of replies that loop (fewer than half of a reply's
            own word bigrams distinct): a white box can loop on every prompt in its own way, which keeps
            distinct-2 over all replies far from 0.
    """

    max_new_tokens: int = 128
    collapse_max_empty_share: float = 0.5
    collapse_min_distinct_2: float = 0.02
    collapse_max_looping_share: float = 0.5

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"evaluation.max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not 0.0 <= self.collapse_max_empty_share <= 1.0:
            raise ValueError(
                f"evaluation.collapse_max_empty_share must be in [0, 1], got {self.collapse_max_empty_share}"
            )
        if not 0.0 <= self.collapse_min_distinct_2 <= 1.0:
            raise ValueError(
                f"evaluation.collapse_min_distinct_2 must be in [0, 1], got {self.collapse_min_distinct_2}"
            )
        if not 0.0 <= self.collapse_max_looping_share <= 1.0:
            raise ValueError(
                "evaluation.collapse_max_looping_share must be in [0, 1], "
                f"got {self.collapse_max_looping_share}"
            )


@dataclass(frozen=True)
class JudgeCheckConfig:
    """Before a fit trains, the judge ranks held-out human-labelled pairs, each in both orders
    (``judges/accuracy.py``): a judge at chance would make the white box worse, not just no better.

    Attributes:
        pairs: how many pairs (two requests each); 0: no check.
        min_accuracy: a judge below it stops the fit before its first step (exit 2); null: measure and log
            only.
        data: ``builtin:hh-harmless-base`` (pairs the package ships, from no run's prompts) or the path of an
            HH-RLHF-format ``.jsonl(.gz)`` of ``chosen``/``rejected`` dialogues.
        max_chars: use only pairs whose texts fit this many characters (bounds the judge's tokens).
    """

    pairs: int = 0
    min_accuracy: float | None = 0.6
    data: str = "builtin:hh-harmless-base"
    max_chars: int = 600

    def __post_init__(self) -> None:
        if self.pairs < 0:
            raise ValueError(f"judge_check.pairs must be >= 0, got {self.pairs}")
        if self.min_accuracy is not None and not 0.0 <= self.min_accuracy <= 1.0:
            raise ValueError(f"judge_check.min_accuracy must be in [0, 1] or null, got {self.min_accuracy}")
        if self.max_chars < 1:
            raise ValueError(f"judge_check.max_chars must be >= 1, got {self.max_chars}")
