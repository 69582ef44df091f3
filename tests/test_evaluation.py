"""Reward-model evaluation: the per-subset metric, the run-directory files, the paper's evaluator preset, and
``validate`` end to end on the tiny config (HH-RLHF per subset, BeaverTails per category)."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch
from lightning.pytorch import LightningDataModule

from cyclealign_pl.cli import CycleAlignCLI, main
from cyclealign_pl.data.hh_rlhf import HHRLHFDataModule
from cyclealign_pl.evaluation import (
    RewardRow,
    SubsetMeanReward,
    eval_paths,
    read_rewards_csv,
    write_eval_outputs,
)
from cyclealign_pl.judges.reward_model import RewardModelJudge, format_for_reward_model
from cyclealign_pl.module import CycleAlignModule
from tests.helpers import TINY_REWARD_MODEL

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny.yaml"
OASST_PRESET = REPO / "configs" / "eval" / "oasst_rm.yaml"
BEAVERTAILS_PRESET = REPO / "configs" / "eval" / "beavertails.yaml"
SHARED = REPO.parent / "shared" / "data"
BEAVERTAILS_CSV = SHARED / "beavertails" / "BeaverTails-Evaluation.csv"

# A two-round HH dialogue and the exact text the paper's evaluator (oasst-rm-2-pythia-6.9b-epoch-1, whose
# tokenizer's EOS is "<|endoftext|>") must read for it, written out by hand.
DIALOGUE = (
    "\n\nHuman: What is a good name for a cat?"
    "\n\nAssistant: How about Whiskers?"
    "\n\nHuman: Something shorter, please.\nIt is a small cat."
    "\n\nAssistant:"
)
REPLY = " Tom. \n"
OASST_TEXT = (
    "<|prompter|>What is a good name for a cat?<|endoftext|>"
    "<|assistant|>How about Whiskers?<|endoftext|>"
    "<|prompter|>Something shorter, please.\nIt is a small cat.<|endoftext|>"
    "<|assistant|>Tom.<|endoftext|>"
)


# ------------------------------------------------------------------------------------ the evaluator preset


def _parse_configs(*configs: Path):
    """The CLI's parsed configuration, without building anything (the preset's model is not downloadable)."""

    class ParseOnly(CycleAlignCLI):
        def instantiate_classes(self) -> None:
            pass

    args = [a for c in configs for a in ("--config", str(c))]
    cli = ParseOnly(
        CycleAlignModule,
        LightningDataModule,
        subclass_mode_data=True,
        auto_configure_optimizers=False,
        run=False,
        args=args,
    )
    return cli.config


def test_oasst_preset_sets_the_papers_evaluator_over_the_tiny_config() -> None:
    config = _parse_configs(TINY, OASST_PRESET)
    judge = config.model.reward_model
    assert judge.class_path == "cyclealign_pl.judges.reward_model.RewardModelJudge"
    args = judge.init_args
    assert args.model == "OpenAssistant/oasst-rm-2-pythia-6.9b-epoch-1"
    assert (args.input_format, args.sigmoid, args.scale) == ("oasst", True, 100.0)
    assert (
        args.config is None and args.tokenizer is None
    )  # nothing of tiny.yaml's random reward model is left
    assert config.model.evaluation.max_new_tokens == 128
    # the preset's format gives the evaluator's input byte for byte
    text = format_for_reward_model(DIALOGUE, REPLY, args.input_format, eos_token="<|endoftext|>")
    assert text.encode("utf-8") == OASST_TEXT.encode("utf-8")


def test_reward_is_100_sigmoid_of_the_logit_of_the_formatted_text() -> None:
    judge = RewardModelJudge(
        config=TINY_REWARD_MODEL, tokenizer="byt5", input_format="oasst", sigmoid=True, scale=100.0, seed=3
    )
    raw = RewardModelJudge(config=TINY_REWARD_MODEL, tokenizer="byt5", input_format="oasst", seed=3)
    eos = judge.tokenizer.eos_token
    expected_text = OASST_TEXT.replace("<|endoftext|>", eos)
    ids = judge.tokenizer(expected_text, add_special_tokens=False, return_tensors="pt")
    with torch.no_grad():
        logit = judge.model(**ids).logits[0, 0].item()
    [reward] = judge.score([DIALOGUE], [REPLY])
    [raw_reward] = raw.score([DIALOGUE], [REPLY])
    assert raw_reward == pytest.approx(logit, abs=1e-5)
    assert reward == pytest.approx(100.0 / (1.0 + math.exp(-logit)), abs=1e-4)
    assert 0.0 < reward < 100.0


# ------------------------------------------------------------------------------------------- the metric


def test_subset_means_and_sample_weighted_total() -> None:
    metric = SubsetMeanReward(["helpful-base", "harmless-base"])
    metric.update(["harmless-base", "harmless-base", "harmless-base"], [1.0, 2.0, 3.0])
    metric.update(["helpful-base"], torch.tensor([10.0]))
    rows = metric.table()
    assert rows == [
        RewardRow("helpful-base", 1, 10.0),
        RewardRow("harmless-base", 3, 2.0),
        RewardRow("total", 4, 4.0),  # (1 + 2 + 3 + 10) / 4, not the mean of the two means (6.0)
    ]
    values = metric.compute()
    assert list(values) == ["helpful-base", "harmless-base", "total"]
    assert values["total"].item() == pytest.approx(4.0)


def test_the_total_can_weight_subsets_by_their_full_test_set_sizes_as_the_paper_does() -> None:
    """Equal samples of two subsets: the sample-weighted total is the plain mean; the paper weights each
    subset by the size of its full test split instead."""
    rewards = {"harmless-base": [40.0, 42.0], "helpful-online": [60.0, 62.0]}
    sizes = {"harmless-base": 2312.0, "helpful-online": 1137.0}
    by_prompt, by_size = SubsetMeanReward(list(rewards)), SubsetMeanReward(list(rewards), weights=sizes)
    for metric in (by_prompt, by_size):
        for subset, values in rewards.items():
            metric.update([subset] * len(values), values)
    assert by_prompt.table()[-1].mean_reward == pytest.approx(51.0)
    assert by_size.table()[-1].mean_reward == pytest.approx((41.0 * 2312 + 61.0 * 1137) / (2312 + 1137))
    assert by_size.table()[:2] == by_prompt.table()[:2]  # the subsets' own rows do not change
    with pytest.raises(ValueError, match="positive"):
        SubsetMeanReward(["a"], weights={"a": 0.0})


@pytest.mark.skipif(
    not (SHARED / "hh-rlhf" / "harmless-base" / "test.jsonl.gz").exists(), reason="needs ../shared"
)
def test_the_data_module_weights_subsets_by_the_rows_of_their_full_evaluation_split() -> None:
    data = HHRLHFDataModule(
        root=str(SHARED / "hh-rlhf"),
        train_split="test",
        eval_split="test",
        eval_prompts_per_subset=10,
        total_weighting="subset_size",
    )
    data.setup("validate")
    assert data.subset_weights() == {"harmless-base": 2312.0}  # the paper's harmless-base test set size
    assert HHRLHFDataModule(root=str(SHARED / "hh-rlhf")).subset_weights() is None


def test_the_paper_configs_weight_the_total_as_the_paper_does() -> None:
    import yaml

    for name in ("llama_rrhf.yaml", "alpaca_pro.yaml"):
        data = yaml.safe_load((REPO / "configs" / name).read_text())["data"]["init_args"]
        assert data["total_weighting"] == "subset_size", name


def test_subsets_registered_as_they_come_survive_reset() -> None:
    metric = SubsetMeanReward()
    metric.update(["b", "a", "b"], [1.0, 5.0, 3.0])
    assert metric.subsets == ["b", "a"]
    assert metric.table()[:2] == [RewardRow("b", 2, 2.0), RewardRow("a", 1, 5.0)]
    metric.reset()
    assert metric.subsets == ["b", "a"]
    metric.update(["a"], [7.0])
    assert metric.table() == [RewardRow("a", 1, 7.0), RewardRow("total", 1, 7.0)]


def test_bad_metric_input_is_named() -> None:
    metric = SubsetMeanReward()
    with pytest.raises(ValueError, match="2 subset names for 1 rewards"):
        metric.update(["a", "b"], [1.0])
    with pytest.raises(ValueError, match="'total'"):
        SubsetMeanReward(["total"])


def test_non_finite_rewards_are_counted_and_left_out(caplog: pytest.LogCaptureFixture) -> None:
    metric = SubsetMeanReward(["a"])
    metric.update(["a", "a", "a"], [1.0, float("nan"), float("inf")])
    assert metric.table()[0] == RewardRow("a", 1, 1.0)
    assert metric.skipped.item() == 2
    assert "skipped 2 non-finite reward(s)" in caplog.text


def test_states_reduce_across_processes_by_summation() -> None:
    """Two ranks' states, gathered as torch.distributed would, give the pooled means and total."""
    rank0, rank1 = SubsetMeanReward(["x", "y"]), SubsetMeanReward(["x", "y"])
    rank0.update(["x", "x", "y"], [1.0, 3.0, 10.0])
    rank1.update(["y", "y"], [20.0, 30.0])

    def all_gather(tensor: torch.Tensor, group=None) -> list[torch.Tensor]:
        name = next(n for n in ("sums", "counts", "skipped") if getattr(rank0, n) is tensor)
        return [tensor, getattr(rank1, name)]

    with rank0.sync_context(dist_sync_fn=all_gather, distributed_available=lambda: True):
        rows = rank0._rows()
    assert rows == [RewardRow("x", 2, 2.0), RewardRow("y", 3, 20.0), RewardRow("total", 5, 64.0 / 5)]
    assert rank0.table()[-1] == RewardRow("total", 3, 14.0 / 3)  # unsynced again afterwards


# -------------------------------------------------------------------------------------------- the files


def test_written_table_reads_back_and_generations_keep_every_field(tmp_path: Path) -> None:
    rows = [RewardRow("harmless-base", 2, 0.1 + 0.2), RewardRow("total", 2, 0.1 + 0.2)]
    records = [
        {
            "id": "a:0",
            "subset": "harmless-base",
            "prompt": "\n\nHuman: hi\n\nAssistant:",
            "reply": "Hello — ünïcode",
            "reward": 0.25,
        }
    ]
    paths = write_eval_outputs(tmp_path, "test", rows, records, {"stage": "test", "checkpoint": None})
    assert paths == eval_paths(tmp_path, "test")
    assert "0.30000000000000004" not in paths["rewards"].read_text()  # a table for people: 4 decimals
    assert read_rewards_csv(paths["rewards"]) == [row._replace(mean_reward=0.3) for row in rows]
    assert [
        json.loads(line) for line in paths["generations"].read_text(encoding="utf-8").splitlines()
    ] == records
    assert json.loads(paths["meta"].read_text())["stage"] == "test"


def test_malformed_rewards_csv_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "val_rewards.csv"
    path.write_text("subset,n,mean_reward\nharmless-base,3,0.5\ntotal,three,0.5\n")
    with pytest.raises(ValueError, match=r"val_rewards.csv, line 3"):
        read_rewards_csv(path)


# ---------------------------------------------------------------------------------- validate end to end


def _validate(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, *extra: str) -> CycleAlignCLI:
    monkeypatch.chdir(tmp_path)  # tiny.yaml writes under runs/tiny
    cli = main(["validate", "--config", str(TINY), *extra])
    assert cli is not None
    return cli


def test_validate_tiny_base_model_logs_and_writes_per_subset_and_total(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    cli = _validate(tmp_path, monkeypatch)  # no --ckpt_path: the base model (a zero-shot row)
    trainer = cli.trainer
    out = capsys.readouterr().out
    assert "cyclealign_pl: validate done: scored 100 of 100 prompts, 1 of 1 subset (harmless-base)" in out
    assert f"  eval files: {Path(trainer.log_dir) / 'eval'}" in out
    assert "Validate metric" not in out  # the report replaces Lightning's table of metrics
    paths = eval_paths(trainer.log_dir, "val")
    assert Path(trainer.log_dir).resolve().is_relative_to(tmp_path.resolve() / "runs" / "tiny")

    rows = read_rewards_csv(paths["rewards"])
    assert [r.subset for r in rows] == ["harmless-base", "total"]
    assert [r.n for r in rows] == [100, 100]  # limit_val_batches 2 x eval_batch_size 50

    records = [json.loads(line) for line in paths["generations"].read_text(encoding="utf-8").splitlines()]
    assert len(records) == 100 and len({r["id"] for r in records}) == 100
    assert all(set(r) == {"id", "subset", "prompt", "reply", "reward"} for r in records)
    assert all(r["prompt"].endswith("\n\nAssistant:") for r in records)
    assert not any("\n\nHuman:" in r["reply"] or "\n\nAssistant:" in r["reply"] for r in records)
    assert rows[-1].mean_reward == pytest.approx(sum(r["reward"] for r in records) / 100, abs=1e-4)

    logged = trainer.callback_metrics
    assert logged["val/reward/harmless-base"].item() == pytest.approx(rows[0].mean_reward, abs=1e-4)
    assert logged["val/reward/total"].item() == pytest.approx(rows[-1].mean_reward, abs=1e-4)
    with open(Path(trainer.log_dir) / "metrics.csv", newline="") as fh:
        header = next(csv.reader(fh))
    assert {"val/reward/harmless-base", "val/reward/total"} <= set(header)

    meta = json.loads(paths["meta"].read_text())
    assert (meta["trainer_fn"], meta["checkpoint"], meta["trained_steps"], meta["prompts"]) == (
        "validate",
        None,
        0,
        100,
    )
    assert meta["max_new_tokens"] == 48 and meta["total_weighting"] == "prompts"


@pytest.mark.skipif(not BEAVERTAILS_CSV.is_file(), reason="../shared/data is not available")
def test_validate_on_beavertails_reports_every_category(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cli = _validate(
        tmp_path,
        monkeypatch,
        "--config",
        str(BEAVERTAILS_PRESET),
        "--data.init_args.path",
        str(BEAVERTAILS_CSV),
        "--data.init_args.prompts_per_category",
        "1",  # 14 prompts, within limit_val_batches 2 x 8
        "--data.init_args.cache_dir",
        str(tmp_path / "hf-cache"),
    )
    rows = read_rewards_csv(eval_paths(cli.trainer.log_dir, "val")["rewards"])
    categories = [r.subset for r in rows[:-1]]
    assert len(categories) == 14 and len(set(categories)) == 14
    assert "animal_abuse" in categories and "controversial_topics,politics" in categories
    assert all(r.n == 1 for r in rows[:-1]) and rows[-1][:2] == ("total", 14)
    assert all(r.empty_share is not None and r.distinct_2 is not None for r in rows)
    assert rows[-1].mean_reward == pytest.approx(sum(r.mean_reward for r in rows[:-1]) / 14, abs=1e-4)
    logged = cli.trainer.callback_metrics
    politics = next(r for r in rows if r.subset == "controversial_topics,politics")
    assert logged["val/reward/controversial_topics,politics"].item() == pytest.approx(
        politics.mean_reward, abs=1e-4
    )


def test_an_evaluation_says_what_it_scored_out_of_what_and_warns_when_it_left_some_out(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """The BeaverTails preset scores every category whatever tiny.yaml limits (2 batches); an explicit limit
    that leaves categories out is a warning naming them and the setting."""
    csv_path = tmp_path / "bt.csv"
    rows = [(f"Question {c}{i}?", f"cat,{c}") for c in "abc" for i in range(4)]  # names with commas
    with csv_path.open("w", newline="") as fh:
        csv.writer(fh).writerows([("prompt", "category"), *rows])
    preset = ("--config", str(BEAVERTAILS_PRESET), "--data.init_args.path", str(csv_path))
    small = ("--data.init_args.eval_batch_size", "4", "--trainer.enable_progress_bar", "false")
    _validate(tmp_path, monkeypatch, *preset, *small)
    captured = capsys.readouterr()
    assert "validate done: scored 12 of 12 prompts, 3 of 3 categories (cat,a; cat,b; cat,c)" in captured.out
    assert "scored only" not in captured.err

    _validate(tmp_path, monkeypatch, *preset, *small, "--trainer.limit_val_batches", "1")
    captured = capsys.readouterr()
    assert "validate done: scored 4 of 12 prompts, 1 of 3 categories (cat,a); not scored: cat,b; cat,c" in (
        captured.out
    )
    warning = [line for line in captured.err.splitlines() if "scored only" in line]
    assert warning == [
        "val scored only 4 of 12 prompts, 1 of 3 categories (cat,a); not scored: cat,b; cat,c; "
        "trainer.limit_val_batches=1 stopped it early: set --trainer.limit_val_batches null to score them all"
    ]


def test_validate_without_an_evaluator_says_what_to_set(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(ValueError, match="set model.reward_model"):
        _validate(tmp_path, monkeypatch, "--model.reward_model", "null")
    assert not list(tmp_path.rglob("val_rewards.csv"))


def test_fit_without_an_evaluator_skips_validation_with_a_warning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.chdir(tmp_path)
    cli = main(
        ["fit", "--config", str(TINY), "--model.reward_model", "null", "--trainer.limit_train_batches", "1"]
    )
    assert cli.trainer.state.finished and cli.model.counters.steps == 1
    assert "no model.reward_model: validation during fit is skipped" in caplog.text
    assert not list(tmp_path.rglob("eval"))
    assert not any(k.startswith("val/") for k in cli.trainer.callback_metrics)


# ------------------------------------------------------------------------------ the default run's evaluations


@pytest.mark.slow
def test_validate_with_and_without_a_checkpoint_shows_the_gain(default_run, validated_run) -> None:
    """``validate`` without a checkpoint is the zero-shot row; with the run's checkpoint it reports the
    trained reward and its gain over the zero-shot evaluation the checkpoint carries (paired by prompt, with
    its SE)."""
    fit = default_run.cli.model.evaluation_summary
    zero_shot = validated_run.zero_shot.model.evaluation_summary
    trained = validated_run.trained.model.evaluation_summary
    assert zero_shot["reward"] == pytest.approx(fit["zero_shot_reward"], rel=1e-6)  # greedy: the same replies
    assert "reward_gain" not in zero_shot  # nothing trained to compare with
    assert trained["reward"] == pytest.approx(fit["reward"], rel=1e-6)
    assert (
        trained["reward_gain"] == pytest.approx(fit["reward_gain"], rel=1e-6)
        and trained["reward_gain_z"] >= 3
    )
    logged = validated_run.trained.trainer.callback_metrics  # what the validate table prints
    assert logged["val/reward_gain"].item() == pytest.approx(trained["reward_gain"], rel=1e-5)
    metas = [
        json.loads(eval_paths(cli.trainer.log_dir, "val")["meta"].read_text())
        for cli in (validated_run.trained, validated_run.zero_shot)
    ]
    assert [(m["trainer_fn"], m["trained_steps"], bool(m["checkpoint"])) for m in metas] == [
        ("validate", 48, True),
        ("validate", 0, False),
    ]
    for cli in (validated_run.trained, validated_run.zero_shot):  # every evaluation under the run
        assert Path(cli.trainer.log_dir).parent == validated_run.root / "logs"


def test_collapsed_replies_are_flagged_in_the_logs_the_table_and_the_summary(tmp_path, caplog) -> None:
    """A white box that only says EOS: validate warns that the replies collapsed and shows it beside the
    reward."""
    from lightning.pytorch import Trainer

    from tests.helpers import make_data, only_says_eos, tiny_module, write_hh_split

    questions = [f"question {i}?" for i in range(6)]
    write_hh_split(
        tmp_path / "hh",
        "harmless-base",
        "test",
        [(f"\n\nHuman: {q}\n\nAssistant: Sure.", f"\n\nHuman: {q}\n\nAssistant: No.") for q in questions],
    )
    module = only_says_eos(
        tiny_module(None, reward_model=RewardModelJudge(config=TINY_REWARD_MODEL, tokenizer="byt5"))
    )
    trainer = Trainer(
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(tmp_path / "run"),
    )
    data = make_data(tmp_path / "hh", train_split="test", eval_prompts_per_subset=6)
    with caplog.at_level("WARNING"):
        trainer.validate(module, data)
    summary = module.evaluation_summary
    assert summary["empty_share"] == 1.0 and "100% of the replies are empty" in summary["collapse_warning"]
    assert "the white box's replies collapsed: 100% of the replies are empty" in caplog.text
    assert trainer.callback_metrics["val/empty_share"].item() == 1.0
    rows = read_rewards_csv(eval_paths(tmp_path / "run", "val")["rewards"])
    assert all(row.empty_share == 1.0 for row in rows)  # beside the reward in the table


def test_replies_that_loop_each_in_their_own_way_are_a_collapse_that_distinct_2_over_all_misses() -> None:
    """Replies of a 64-prompt SmolLM2 fit on a chance-level judge (docs/real_models.md): every prompt gets its
    own loop, so distinct-2 over all replies stays far above its floor; the share of looping replies shows it.
    """
    from cyclealign_pl.evaluation import collapse_warning, reply_stats
    from cyclealign_pl.settings import EvaluationConfig

    loops = [
        "I'm a little bit complicated. " * 8,
        "You can also do some other things with pens, the idea is that you can do " * 4,
        "I can't. I'm made to be to make people feel comfortable. I'm made to be to make people feel. " * 3,
        f"{' '.join(f'step {i}.' for i in range(12))} " * 3,
    ]
    fine = [
        "The capital of France is Paris, a city on the Seine with about two million people.",
        "I'm sorry, I can't help with that.",
        "Yes yes.",  # too short to call a loop
    ]
    stats = reply_stats(loops + fine)
    assert stats.looping_share == pytest.approx(4 / 7) and stats.distinct_2 > 0.2
    warning = collapse_warning(stats, max_empty_share=0.5, min_distinct_2=0.02, max_looping_share=0.5)
    assert warning == "57% of the replies loop, repeating their own words (more than 50%)"
    assert reply_stats(fine).looping_share == 0.0
    assert collapse_warning(reply_stats(fine), 0.5, 0.02, 0.5) is None
    with pytest.raises(ValueError, match="collapse_max_looping_share must be in"):
        EvaluationConfig(collapse_max_looping_share=1.5)
