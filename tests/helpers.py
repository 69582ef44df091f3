"""What many tests share: tiny models built from configs, real judges with simple rules, trainers and
HH files.

Fixtures live in ``conftest.py``; this module holds plain functions and classes that tests import.
"""

from __future__ import annotations

import gzip
import json
import sys
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from lightning.pytorch import Trainer

from cyclealign_pl.data.hh_rlhf import HHRLHFDataModule
from cyclealign_pl.judges.base import Judge, Judgment, RankRequest
from cyclealign_pl.module import CycleAlignModule
from cyclealign_pl.policy import Reply, SamplingConfig, WhiteBox
from cyclealign_pl.ranking import rank_by_scores
from cyclealign_pl.settings import EvaluationConfig, WhiteBoxConfig

TINY_LLAMA = {
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "max_position_embeddings": 512,
}
TINY_REWARD_MODEL = {**TINY_LLAMA, "vocab_size": 384, "pad_token_id": 0}

QUESTIONS = [f"question {i}?" for i in range(48)]
GOOD = ("Sure, glad to help.", "Happy to help you.")
BAD = ("No. Go away.", "Not my problem.")


def is_good(reply: str) -> bool:
    return "help" in reply


def hh_prompt(question: str) -> str:
    return f"\n\nHuman: {question}\n\nAssistant:"


def write_hh_split(root: Path, subset: str, split: str, pairs: Sequence[tuple[str, str]]) -> Path:
    """Write ``<root>/<subset>/<split>.jsonl.gz`` in the upstream HH-RLHF layout from (chosen, rejected)
    pairs."""
    path = root / subset / f"{split}.jsonl.gz"
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt", encoding="utf-8") as f:
        for chosen, rejected in pairs:
            f.write(json.dumps({"chosen": chosen, "rejected": rejected}) + "\n")
    return path


# -- judges with simple rules ---------------------------------------------------------------------------


class PrefersHelpJudge(Judge):
    """A black box with one simple preference: replies that offer help first, then shorter ones."""

    def __init__(self, better_response: str | None = None) -> None:
        self.better_response = better_response
        self.requests: list[RankRequest] = []

    def rank(self, requests: Sequence[RankRequest]) -> list[Judgment]:
        self.requests.extend(requests)
        out = []
        for r in requests:
            scores = [float(is_good(c)) - 0.001 * len(c) for c in r.candidates]
            out.append(Judgment(ranking=rank_by_scores(scores), better_response=self.better_response))
        return out


class LongestFirstJudge(Judge):
    """Ranks longer replies first (ties by index) and offers a better reply: deterministic and cheap."""

    def __init__(self, better_response: str | None = None) -> None:
        self.better_response = better_response
        self.requests: list[RankRequest] = []

    def rank(self, requests: Sequence[RankRequest]) -> list[Judgment]:
        self.requests.extend(requests)
        return [
            Judgment(
                ranking=tuple(sorted(range(len(r.candidates)), key=lambda i: (-len(r.candidates[i]), i))),
                better_response=self.better_response,
            )
            for r in requests
        ]


def swap_top_two(ranking: tuple[int, ...]) -> tuple[int, ...]:
    return (ranking[1], ranking[0], *ranking[2:])


class SampleLog:
    """Remembers the replies a white box sampled, so that a judge can score exactly what the cycle scored."""

    def __init__(self, whitebox: WhiteBox) -> None:
        self.whitebox = whitebox
        self.groups: dict[tuple[str, tuple[str, ...]], list[Reply]] = {}
        sample = whitebox.sample

        def logged(prompts: Sequence[str], num_candidates: int) -> list[list[Reply]]:
            groups = sample(prompts, num_candidates)
            for prompt, group in zip(prompts, groups):
                self.groups[prompt, tuple(r.text for r in group)] = group
            return groups

        whitebox.sample = logged  # type: ignore[method-assign]

    def own_rankings(self, requests: Sequence[RankRequest]) -> list[tuple[int, ...]]:
        """The white box's own rankings of the requests' candidates: the very scores the cycle computes."""
        replies = [self.groups[r.instruction, tuple(r.candidates)] for r in requests]
        with torch.no_grad():
            scored = self.whitebox.score([r.instruction for r in requests], replies)
        return [rank_by_scores(row) for row in scored.scores.float().tolist()]


class WhiteBoxMirrorJudge(Judge):
    """Ranks with the white box's own scores, then applies ``transform``: identity always agrees."""

    def __init__(self, transform: Callable[[tuple[int, ...]], tuple[int, ...]] = lambda r: r) -> None:
        self.transform = transform
        self.samples: SampleLog | None = None
        self.requests: list[RankRequest] = []
        self.rankings: list[tuple[int, ...]] = []

    def watch(self, whitebox: WhiteBox) -> None:
        self.samples = SampleLog(whitebox)

    def rank(self, requests: Sequence[RankRequest]) -> list[Judgment]:
        self.requests.extend(requests)
        rankings = [self.transform(r) for r in self.samples.own_rankings(requests)]
        self.rankings.extend(rankings)
        return [Judgment(ranking=r) for r in rankings]


class AgreesAtIterationJudge(WhiteBoxMirrorJudge):
    """Mirrors the white box, swapped at the top until a prompt's chosen iteration, where it agrees. Each
    prompt agrees at iteration ``1 + crc32(prompt) % spread`` (counted by its demonstrations: the static one
    plus one agreement per earlier iteration); ``spread=None`` never agrees."""

    def __init__(self, spread: int | None = 3, better_response: str | None = GOOD[0]) -> None:
        super().__init__()
        self.spread = spread
        self.better_response = better_response

    def agrees(self, request: RankRequest) -> bool:
        if self.spread is None:
            return False
        return len(request.demonstrations) == 1 + zlib.crc32(request.instruction.encode()) % self.spread

    def rank(self, requests: Sequence[RankRequest]) -> list[Judgment]:
        self.requests.extend(requests)
        own = self.samples.own_rankings(requests)
        return [
            Judgment(
                ranking=ranking if self.agrees(r) else swap_top_two(ranking),
                better_response=self.better_response,
            )
            for r, ranking in zip(requests, own)
        ]


# -- trainers, data, modules ----------------------------------------------------------------------------


def make_trainer(root: Path, batches: int, **kwargs) -> Trainer:
    options = dict(
        accelerator="cpu",
        devices=1,
        max_epochs=1,
        limit_train_batches=batches,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(root),
    )
    options.update(kwargs)
    return Trainer(**options)


def make_data(root: Path, batch_size: int = 1, **kwargs) -> HHRLHFDataModule:
    options = dict(root=str(root), num_train_prompts=None, eval_prompts_per_subset=2, batch_size=batch_size)
    options.update(kwargs)
    return HHRLHFDataModule(**options)


def tiny_module(judge: Judge | None, **kwargs) -> CycleAlignModule:
    """A CycleAlignModule around a tiny random Llama with the byte tokenizer (seeded, so runs repeat)."""
    torch.manual_seed(0)
    options = dict(
        model_config=TINY_LLAMA,
        tokenizer="byt5",
        judge=judge,
        sampling=SamplingConfig(max_new_tokens=16),
        whitebox=WhiteBoxConfig(max_length=128),
        evaluation=EvaluationConfig(max_new_tokens=32),
    )
    options.update(kwargs)
    module_class = options.pop("module_class", CycleAlignModule)
    module = module_class(**options)
    if isinstance(judge, WhiteBoxMirrorJudge):
        judge.watch(module.whitebox)
    return module


def only_says_eos(module: CycleAlignModule) -> CycleAlignModule:
    """The module with an output head that puts all weight on EOS: every reply it writes is empty."""
    head = module.model.lm_head
    eos_only = torch.nn.Linear(head.in_features, head.out_features, bias=True)
    with torch.no_grad():
        eos_only.weight.zero_()
        eos_only.bias.zero_()
        eos_only.bias[module.tokenizer.eos_token_id] = 100.0
    module.model.lm_head = eos_only
    return module


def update_recorder(model: torch.nn.Module, lr: float = 1e-2):
    """A plain optimizer step that records, per call, whether it ran and whether it changed the parameters."""
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    calls: list[bool] = []

    def update(loss: torch.Tensor | None) -> bool:
        if loss is None:
            calls.append(False)
            return False
        before = [p.detach().clone() for p in model.parameters()]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        calls.append(any(not torch.equal(b, p) for b, p in zip(before, model.parameters())))
        return True

    return update, calls


def tiny_llama_for(tokenizer) -> torch.nn.Module:
    """A tiny random Llama (``TINY_LLAMA``, seed 0) sized to ``tokenizer``'s vocabulary and special tokens."""
    from transformers import AutoConfig, AutoModelForCausalLM

    settings = {k: v for k, v in TINY_LLAMA.items() if k != "model_type"}
    config = AutoConfig.for_model(
        "llama",
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        **settings,
    )
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config)


def bpe_tokenizer(texts: Sequence[str], vocab_size: int = 400):
    """A byte-level BPE tokenizer (GPT-2 style: a leading space belongs to the next word) trained offline on
    ``texts``, as a transformers fast tokenizer with ``</s>`` for EOS and ``<pad>`` for padding."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    trainer = ByteLevelBPETokenizer()
    trainer.train_from_iterator(
        list(texts), vocab_size=vocab_size, min_frequency=1, special_tokens=["<pad>", "</s>"]
    )
    return PreTrainedTokenizerFast(tokenizer_object=trainer._tokenizer, eos_token="</s>", pad_token="<pad>")


# ChatML (SmolLM2, Qwen): the template of a chat white box, for an offline tokenizer
CHATML_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>' + '\\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def chat_tokenizer(texts: Sequence[str], vocab_size: int = 400):
    """:func:`bpe_tokenizer` with ChatML's turn tokens and chat template (a chat white box, offline)."""
    tokenizer = bpe_tokenizer(texts, vocab_size)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


ROOT = Path(__file__).resolve().parents[1]
TINY_CONFIG = ROOT / "configs" / "tiny.yaml"


class Capture:
    """stdout/stderr of an in-process CLI call (session- and module-scoped fixtures cannot use capsys)."""

    def __enter__(self) -> Capture:
        import io
        from contextlib import redirect_stderr, redirect_stdout

        self._out, self._err = io.StringIO(), io.StringIO()
        self._stack = [redirect_stdout(self._out), redirect_stderr(self._err)]
        for cm in self._stack:
            cm.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        for cm in reversed(self._stack):
            cm.__exit__(*exc)
        self.out, self.err = self._out.getvalue(), self._err.getvalue()


def cli_args(root: Path, *extra: str, config: Path = TINY_CONFIG) -> list[str]:
    """The default config with every output under ``root`` and no progress bar. ``root`` comes last: a
    ``--config`` among ``extra`` (configs/tiny_openai.yaml names a root of its own) cannot move the run."""
    return [
        "--config",
        str(config),
        "--trainer.enable_progress_bar",
        "false",
        *extra,
        "--trainer.default_root_dir",
        str(root),
    ]


def fit_command(root: Path, *extra: str, config: Path = TINY_CONFIG) -> list[str]:
    """``python -m cyclealign_pl fit`` with :func:`cli_args`: a fit in a subprocess (signals, DDP, a fresh
    process's imports)."""
    return [sys.executable, "-m", "cyclealign_pl", "fit", *cli_args(root, *extra, config=config)]
