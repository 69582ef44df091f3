"""The command line: the tiny fit end to end, bad configs, and the GPU configs (parsed and built where possible)."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import yaml

from cyclealign_pl.cli import main

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.yaml")


def tiny_args(run_dir: Path, *extra: str) -> list[str]:
    return [
        "--config", TINY,
        "--trainer.default_root_dir", str(run_dir),
        "--trainer.logger.init_args.save_dir", str(run_dir),
        "--trainer.callbacks.dirpath", str(run_dir / "checkpoints"),
        "--trainer.enable_progress_bar", "false",
        *extra,
    ]


@pytest.mark.slow
def test_tiny_fit_writes_checkpoint_metrics_and_exported_model(tmp_path):
    cli = main(["fit", *tiny_args(tmp_path, "--trainer.limit_train_batches", "3", "--trainer.limit_val_batches", "0")])
    module = cli.model
    assert module.counters["steps"] == 3
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()

    log_dir = Path(cli.trainer.log_dir)
    rows = list(csv.DictReader(open(log_dir / "metrics.csv")))
    iterations = [float(r["cycle/iterations"]) for r in rows if r.get("cycle/iterations")]
    assert len(iterations) == 3 and all(1 <= i <= 5 for i in iterations)
    assert any(r.get("train/loss") for r in rows)
    saved = yaml.safe_load(open(log_dir / "config.yaml"))
    assert saved["model"]["cycle"]["num_candidates"] == 3

    from transformers import AutoModelForCausalLM, AutoTokenizer

    exported = log_dir / "hf_model"
    reloaded = AutoModelForCausalLM.from_pretrained(exported)
    tokenizer = AutoTokenizer.from_pretrained(exported)
    for name, tensor in module.model.state_dict().items():
        assert (reloaded.state_dict()[name] == tensor).all(), name
    assert tokenizer("hi").input_ids


@pytest.mark.parametrize(
    "override, message",
    [
        (["--model.cycle.bogus", "1"], "bogus"),
        (["--model.cycle.num_candidates", "three"], "num_candidates"),
        (["--model.cycle.num_candidates", "1"], "num_candidates (l) must be >= 2"),
        (["--model.cycle.max_iterations", "0"], "max_iterations (N) must be >= 1"),
        (["--model.cycle.objective", "dpo"], "objective"),
        (["--model.model_config", "null", "--model.model", "/no/such/model"], "could not load causal LM '/no/such/model'"),
        (["--model.ablation", "no_everything"], "ablation"),
        (["--data.init_args.subsets", "[harmless-bass]"], "harmless-bass"),
    ],
)
def test_bad_config_fails_at_once_with_a_clear_message(override, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *tiny_args(tmp_path, *override)])
    assert exit_info.value.code != 0
    assert message in capsys.readouterr().err
    assert not (tmp_path / "checkpoints").exists()


@pytest.mark.parametrize("name, objective", [("llama_rrhf.yaml", "rrhf"), ("alpaca_pro.yaml", "pro")])
def test_gpu_configs_parse_and_build_what_needs_no_gpu(name, objective, capsys, monkeypatch):
    config_path = ROOT / "configs" / name
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(config_path), "--print_config"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out  # deepspeed may log "[date] [WARNING] ..." lines to stdout on import
    printed = yaml.safe_load("\n".join(line for line in out.splitlines() if not line.startswith("[")))
    assert printed["model"]["cycle"] == {**printed["model"]["cycle"], "num_candidates": 3, "max_iterations": 5, "objective": objective}
    assert printed["model"]["max_length"] == 512 and printed["data"]["init_args"]["batch_size"] == 1
    assert printed["model"]["optimizer"]["init_args"]["lr"] == pytest.approx(5e-5)
    assert printed["data"]["init_args"]["num_train_prompts"] == 1000

    # the DeepSpeed ZeRO stage-2 strategy and its config build on the CPU (fit() itself needs CUDA)
    from lightning.pytorch.strategies import DeepSpeedStrategy

    strategy_spec = printed["trainer"]["strategy"]
    assert strategy_spec["class_path"].endswith("DeepSpeedStrategy")
    strategy = DeepSpeedStrategy(**strategy_spec["init_args"])
    zero = strategy.config["zero_optimization"]
    assert zero["stage"] == 2 and zero["offload_optimizer"]["device"] == "cpu"

    # the black box builds without network or key (the key is read at the first request only)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    from cyclealign_pl.judges.openai import OpenAIJudge

    judge_spec = printed["model"]["judge"]
    judge = OpenAIJudge(**judge_spec["init_args"])
    assert judge.model == "gpt-3.5-turbo-0613"
    judge.close()

    from cyclealign_pl.data.hh_rlhf import HHRLHFDataModule

    data = HHRLHFDataModule(**printed["data"]["init_args"])
    assert data.root is None and len(data.subsets) == 4


@pytest.mark.slow
def test_tiny_fit_against_a_local_openai_compatible_server(tmp_path, monkeypatch):
    """configs/tiny.yaml + configs/tiny_openai.yaml: the black box is a real HTTP server on 127.0.0.1."""
    from cyclealign_pl.testing.openai_server import LocalOpenAIServer

    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-local")
    cache = tmp_path / "judge_cache.sqlite"
    with LocalOpenAIServer() as server:
        cli = main(
            [
                "fit",
                *tiny_args(tmp_path, "--trainer.limit_train_batches", "3", "--trainer.limit_val_batches", "0"),
                "--config", str(ROOT / "configs" / "tiny_openai.yaml"),
                "--model.judge.init_args.base_url", server.url,
                "--model.judge.init_args.cache_path", str(cache),
            ]
        )
        requests_seen = len(server.requests)
    module = cli.model
    assert type(module.judge).__name__ == "OpenAIJudge"
    assert module.counters["steps"] == 3
    # every iteration with >= 2 distinct candidates asked the server once
    assert requests_seen == module.counters["iterations"] - module.counters["degenerate_sets"] > 0
    rows = list(csv.DictReader(open(Path(cli.trainer.log_dir) / "metrics.csv")))
    sent = [float(r["judge/requests_sent"]) for r in rows if r.get("judge/requests_sent")]
    assert sent and sent[-1] == requests_seen
    assert any(r.get("judge/prompt_tokens") for r in rows)
    assert cache.is_file()
