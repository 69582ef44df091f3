"""A reward model made of a frozen sentence encoder and a small trained head on its pooled features.

Fine-tuning even a 22 M-parameter encoder on 2 CPU cores takes far longer than a first run may; a frozen
encoder's features are computed once per pair and the head trains in seconds. The head reads the final hidden
state of the first token and the mean over all tokens (what sentence encoders are trained to pool),
standardised by the training features' mean and spread.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from transformers import AutoModel, PreTrainedModel
from transformers.modeling_outputs import SequenceClassifierOutput

from cyclealign_pl.hf import ModelLoadError

HEAD_WEIGHTS = "head.safetensors"
HEAD_CARD = "head.json"


def pooled_features(hidden: Tensor, attention_mask: Tensor) -> Tensor:
    """``[first token, mean over tokens]`` of the last hidden states: (batch, 2 x hidden size)."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    mean = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
    return torch.cat([hidden[:, 0], mean], dim=-1)


class RewardHead(nn.Module):
    """Standardised pooled features -> a linear layer (``hidden=0``) or one tanh layer -> the reward logit."""

    def __init__(self, in_features: int, hidden: int = 0) -> None:
        super().__init__()
        self.in_features = in_features
        self.hidden = hidden
        self.register_buffer("mean", torch.zeros(in_features))
        self.register_buffer("std", torch.ones(in_features))
        if hidden:
            self.net: nn.Module = nn.Sequential(
                nn.Linear(in_features, hidden), nn.Tanh(), nn.Linear(hidden, 1)
            )
        else:
            self.net = nn.Linear(in_features, 1)

    def fit_standardisation(self, features: Tensor) -> None:
        self.mean.copy_(features.mean(0))
        self.std.copy_(features.std(0).clamp(min=1e-6))

    def forward(self, features: Tensor) -> Tensor:
        return self.net((features - self.mean) / self.std).squeeze(-1)


class EncoderRewardModel(nn.Module):
    """Encoder + head with the interface ``RewardModelJudge`` scores through: ``model(**enc).logits``."""

    def __init__(self, encoder: PreTrainedModel, head: RewardHead) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = head

    @property
    def config(self) -> Any:
        return self.encoder.config

    def features(self, input_ids: Tensor, attention_mask: Tensor, **kwargs: Any) -> Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask, **kwargs).last_hidden_state
        return pooled_features(hidden, attention_mask)

    def forward(self, input_ids: Tensor, attention_mask: Tensor, **kwargs: Any) -> SequenceClassifierOutput:
        return SequenceClassifierOutput(
            logits=self.head(self.features(input_ids, attention_mask, **kwargs))[:, None]
        )


def file_digest(path: str | Path) -> str:
    """sha256 of a file (the encoder's weights the head was trained on)."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save_head(head: RewardHead, directory: str | Path, card: dict[str, Any]) -> Path:
    """The head's weights and its card (how it was made and what it scored) into ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {name: value.detach().contiguous() for name, value in head.state_dict().items()}
    save_file(tensors, directory / HEAD_WEIGHTS)
    full = {"in_features": head.in_features, "hidden": head.hidden, **card}
    (directory / HEAD_CARD).write_text(json.dumps(full, indent=2) + "\n", encoding="utf-8")
    return directory


def read_card(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / HEAD_CARD
    if not path.is_file():
        raise ModelLoadError(f"no reward head in {directory} (expected {HEAD_CARD} and {HEAD_WEIGHTS})")
    return json.loads(path.read_text(encoding="utf-8"))


def load_head(directory: str | Path) -> tuple[RewardHead, dict[str, Any]]:
    card = read_card(directory)
    head = RewardHead(int(card["in_features"]), int(card["hidden"]))
    head.load_state_dict(load_file(Path(directory) / HEAD_WEIGHTS))
    return head.eval(), card


def load_encoder(path: str | Path) -> PreTrainedModel:
    try:
        return AutoModel.from_pretrained(str(path))
    except (OSError, ValueError) as error:
        raise ModelLoadError(f"could not load the sentence encoder {str(path)!r}: {error}") from error
