"""Several processes: DDP on the CPU (2 processes, gloo) end to end, DeepSpeed ZeRO-2 as far as it builds
without a GPU, and the export of any checkpoint to a plain Hugging Face model."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from lightning.pytorch import Callback

from cyclealign_pl.cli import main
from cyclealign_pl.judges.cache import JudgeCache
from tests.helpers import TINY_LLAMA, cli_args, fit_command
from tests.openai_server import Behaviour, LocalOpenAIServer

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.yaml")
TINY_OPENAI = str(ROOT / "configs" / "tiny_openai.yaml")
DEEPSPEED = str(ROOT / "configs" / "deepspeed_stage_2.yaml")


class RankReport(Callback):
    """Writes what one process did (its counters at start and end, its prompts, its judge's counters) to
    ``<path>/rank<N>.json`` at the end of fit, so a test can add up the processes itself."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.start: dict[str, int] = {}
        self.prompt_ids: list[str] = []
        self.weights_at_start: str = ""
        self.after_first_step: dict[str, Any] = {}

    def on_train_start(self, trainer, pl_module) -> None:
        self.start = pl_module.counters.as_dict()
        self.weights_at_start = weights_digest(pl_module)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.prompt_ids.extend(batch["id"])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not self.after_first_step:
            self.after_first_step = {
                "weights": weights_digest(pl_module),
                "counters": pl_module.counters.as_dict(),
            }

    def on_train_end(self, trainer, pl_module) -> None:
        Path(self.path).mkdir(parents=True, exist_ok=True)
        report = {
            "world_size": trainer.world_size,
            "start": self.start,
            "end": pl_module.counters.as_dict(),
            "prompt_ids": self.prompt_ids,
            "judge": pl_module.judge.metrics(),
            "trained_ids": list(pl_module.trained_ids),
            "weights_at_start": self.weights_at_start,
            "after_first_step": self.after_first_step,
        }
        Path(self.path, f"rank{trainer.global_rank}.json").write_text(json.dumps(report))


def weights_digest(pl_module) -> str:
    """A hash of every parameter's bytes: equal only for bit-identical weights."""
    digest = hashlib.sha256()
    for tensor in pl_module.model.state_dict().values():
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def ddp_fit(
    run_dir: Path, server: LocalOpenAIServer, *extra: str
) -> tuple[list[dict[str, Any]], list[dict[str, str]]]:
    """``python -m cyclealign_pl fit`` with DDP over 2 CPU processes (Lightning launches rank 1 itself)."""
    reports = run_dir / f"ranks{len(list(run_dir.glob('ranks*')))}"
    command = fit_command(
        run_dir,
        "--config",
        TINY_OPENAI,
        "--trainer.strategy",
        "ddp",
        "--trainer.devices",
        "2",
        "--trainer.accelerator",
        "cpu",
        "--trainer.callbacks+="
        + json.dumps(
            {"class_path": "tests.test_distributed.RankReport", "init_args": {"path": str(reports)}}
        ),
        "--trainer.limit_train_batches",
        "2",
        "--trainer.limit_val_batches",
        "0",
        "--model.judge.init_args.base_url",
        server.url,
        "--model.judge.init_args.cache_path",
        str(run_dir / "judge_cache.sqlite"),
        "--model.cycle.max_iterations",
        "2",
        "--model.sampling.max_new_tokens",
        "16",
        "--model.whitebox.max_length",
        "160",
        # a random white box: its samples always differ, so every iteration asks the judge (the counts below)
        "--model.model",
        "null",
        "--model.tokenizer",
        "byt5",
        "--model.model_config",
        json.dumps(TINY_LLAMA),
        "--data.init_args.batch_size",
        "2",
        "--data.init_args.num_train_prompts",
        "16",
        *extra,
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    env.pop("OPENAI_API_KEY", None)  # a loopback server needs no key
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    ranks = [json.loads((reports / f"rank{r}.json").read_text()) for r in range(2)]
    log_dirs = sorted((run_dir / "logs").glob("version_*"), key=lambda p: int(p.name.split("_")[1]))
    rows = list(csv.DictReader(open(log_dirs[-1] / "metrics.csv")))
    return ranks, rows


def last(rows: list[dict[str, str]], name: str) -> float:
    return [float(r[name]) for r in rows if r.get(name)][-1]


@pytest.mark.slow
def test_ddp_two_processes_fit_reduce_metrics_share_the_judge_cache_and_resume(tmp_path):
    with LocalOpenAIServer() as server:
        # the first step's rounds (2 rounds x 2 processes x 2 prompts) get no ranking: no process has a loss
        server.enqueue(*[Behaviour.reply("They all look fine to me.")] * 8)
        ranks, rows = ddp_fit(tmp_path, server)
        assert [r["world_size"] for r in ranks] == [2, 2]
        # ... so no process steps: a step on zero gradients would still move the weights (AdamW's decay,
        # momentum)
        for r in ranks:
            first = r["after_first_step"]
            assert first["counters"]["iterations"] == 4 and first["counters"]["optimizer_steps"] == 0
            assert first["weights"] == r["weights_at_start"], "the weights moved without any judgment"
        assert all(r["end"]["optimizer_steps"] > 0 for r in ranks)  # the later steps had rankings and trained
        # each process trains its own prompts (Lightning's DistributedSampler), each exactly once
        assert all(len(r["prompt_ids"]) == 4 for r in ranks)
        assert not set(ranks[0]["prompt_ids"]) & set(ranks[1]["prompt_ids"])
        assert all(sorted(r["trained_ids"]) == sorted(r["prompt_ids"]) for r in ranks)
        # the logged counters are sums over both processes
        for name in ("prompts", "iterations", "judge_failures", "optimizer_steps"):
            assert last(rows, f"counters/{name}") == sum(r["end"][name] for r in ranks), name
        assert last(rows, "counters/prompts") == 8
        # how much of the judge's latency the white box hid (over both processes)
        assert 0 <= last(rows, "cycle/judge_hidden_fraction_mean") <= 1
        assert all(
            float(r["time/judge_wait_s"]) <= float(r["time/judge_latency_s"])
            for r in rows
            if r.get("time/judge_wait_s")
        )
        # one judge cache file and one spend ledger for both processes: every request sent by either is in
        # both
        sent = max(r["judge"]["requests_sent"] for r in ranks)  # each process reports the run's ledger
        assert sent == len(server.requests) > 0
        cache = JudgeCache(tmp_path / "judge_cache.sqlite")
        assert len(cache) == sent
        cache.close()

        # the checkpoint holds each process's own state (counters, prompts in flight, random streams)
        checkpoint = torch.load(
            tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False
        )
        processes = checkpoint["cyclealign"]["processes"]
        assert [p["counters"]["prompts"] for p in processes] == [r["end"]["prompts"] for r in ranks]
        saved = {name: sum(p["counters"][name] for p in processes) for name in ("prompts", "iterations")}

        # resume under DDP: both processes restore their own state, train two more batches each, totals
        # continue
        resumed, rows = ddp_fit(
            tmp_path,
            server,
            "--ckpt_path",
            str(tmp_path / "checkpoints" / "last.ckpt"),
            "--trainer.max_epochs",
            "2",
        )
    assert all(r["end"]["steps"] - r["start"]["steps"] == 2 for r in resumed)
    assert all(r["start"]["steps"] == 2 for r in resumed)  # restored from the checkpoint
    assert [r["start"]["prompts"] for r in resumed] == [p["counters"]["prompts"] for p in processes]
    for name in ("prompts", "iterations"):
        new = sum(r["end"][name] - r["start"][name] for r in resumed)
        assert last(rows, f"counters/{name}") == saved[name] + new, name
    assert last(rows, "counters/prompts") == 16


@pytest.mark.slow
def test_the_default_fit_with_its_evaluations_ends_under_ddp(tmp_path):
    """The default fit under DDP on 2 CPU processes, both evaluations included: the zero-shot one (3 batches,
    shared unevenly: 2 on one process, 1 on the other) and the final one. Each process asks its collectives
    in the same order whatever its own work, so the fit ends (it used to hang in its first step) and reports
    the gain over the zero-shot model."""
    command = fit_command(
        tmp_path,
        "--trainer.strategy",
        "ddp",
        "--trainer.devices",
        "2",
        "--trainer.limit_train_batches",
        "3",
        "--trainer.limit_val_batches",
        "3",
        "--data.init_args.eval_batch_size",
        "4",
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "fit done: 6 steps, 6 prompts" in done.stdout  # 3 steps of 1 prompt on each process
    assert "gain" in done.stdout and "zero-shot" in done.stdout
    eval_dir = tmp_path / "logs" / "version_0" / "eval"
    zero_shot = json.loads((eval_dir / "zero_shot_meta.json").read_text())
    final = json.loads((eval_dir / "val_meta.json").read_text())
    assert zero_shot["prompts"] == 3 * 4  # the 3 batches, over both processes
    assert final["prompts"] == 2 * 3 * 4  # 3 batches on each process
    assert final["summary"]["paired_prompts"] == 12


# -- DeepSpeed ZeRO-2: what builds without a GPU ----------------------------------------------------------


def printed_config(args: list[str], capsys) -> dict[str, Any]:
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *args, "--print_config"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out  # deepspeed may log "[date] [WARNING] ..." lines to stdout on import
    return yaml.safe_load("\n".join(line for line in out.splitlines() if not line.startswith("[")))


def test_deepspeed_stage_2_by_name_parses_and_builds(capsys):
    from lightning.pytorch.strategies import StrategyRegistry

    printed = printed_config(["--config", TINY, "--trainer.strategy", "deepspeed_stage_2"], capsys)
    assert printed["trainer"]["strategy"] == "deepspeed_stage_2"
    strategy = StrategyRegistry.get("deepspeed_stage_2")
    assert strategy.config["zero_optimization"]["stage"] == 2


def test_deepspeed_preset_parses_and_builds(capsys):
    from lightning.pytorch.strategies import DeepSpeedStrategy

    printed = printed_config(["--config", TINY, "--config", DEEPSPEED], capsys)
    trainer = printed["trainer"]
    assert trainer["precision"] == "bf16-mixed" and trainer["accelerator"] == "gpu"
    assert trainer["strategy"]["class_path"].endswith("DeepSpeedStrategy")
    strategy = DeepSpeedStrategy(**trainer["strategy"]["init_args"])
    zero = strategy.config["zero_optimization"]
    assert zero["stage"] == 2 and "offload_optimizer" not in zero
    assert zero["reduce_bucket_size"] == 200_000_000
    assert printed["model"]["cycle"]["num_candidates"] == 3  # the preset only adds to the run's config


@pytest.mark.parametrize("preset, expected", [(None, 0.7), (0.7, 0.7), (0.5, "disagree")])
def test_the_modules_gradient_clip_val_reaches_the_deepspeed_config(preset, expected):
    """DeepSpeed clips inside its engine, with the value of its config; Lightning fills that from the Trainer,
    which manual optimization leaves unset: the module's ``gradient_clip_val`` must get there itself."""
    from lightning.pytorch import Trainer
    from lightning.pytorch.strategies import DeepSpeedStrategy

    from tests.helpers import LongestFirstJudge, tiny_module

    config = {"zero_optimization": {"stage": 2}, "train_micro_batch_size_per_gpu": 1}
    if preset is not None:
        config["gradient_clipping"] = preset
    trainer = Trainer(
        accelerator="cpu",
        devices=1,
        strategy=DeepSpeedStrategy(config=config),
        logger=False,
        enable_checkpointing=False,
    )
    module = tiny_module(LongestFirstJudge(), gradient_clip_val=0.7)
    trainer.strategy.connect(module)
    module.trainer = trainer
    if expected == "disagree":
        with pytest.raises(
            ValueError, match="gradient_clip_val=0.7 and the DeepSpeed config's gradient_clipping=0.5"
        ):
            module._configure_deepspeed()
        return
    module._configure_deepspeed()
    trainer.strategy._format_config()  # what the strategy hands to deepspeed.initialize
    assert trainer.strategy.config["gradient_clipping"] == expected


def test_deepspeed_on_the_cpu_fails_with_a_clear_message(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(
            [
                "fit",
                *cli_args(
                    tmp_path,
                    "--trainer.strategy",
                    "deepspeed_stage_2",
                    "--trainer.logger",
                    "false",
                    "--trainer.callbacks",
                    "[]",
                ),
            ]
        )
    assert exit_info.value.code != 0
    assert "GPU" in capsys.readouterr().err
    assert not (tmp_path / "checkpoints").exists()


# -- export: any checkpoint to a plain Hugging Face model ----------------------------------------------------


def test_export_writes_a_plain_hf_model_from_a_checkpoint(hh_root, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cyclealign_pl.export import main as export_main
    from tests.helpers import (
        QUESTIONS,
        WhiteBoxMirrorJudge,
        make_data,
        make_trainer,
        swap_top_two,
        tiny_module,
    )

    module = tiny_module(WhiteBoxMirrorJudge(swap_top_two))
    trainer = make_trainer(tmp_path, batches=1)
    trainer.fit(module, make_data(hh_root(QUESTIONS[:8])))
    trainer.save_checkpoint(tmp_path / "run.ckpt")

    export_main([str(tmp_path / "run.ckpt"), str(tmp_path / "hf")])
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    assert AutoTokenizer.from_pretrained(tmp_path / "hf")("hi").input_ids
    trained = module.model.state_dict()
    assert trained.keys() == reloaded.state_dict().keys()
    for name, tensor in reloaded.state_dict().items():
        assert torch.equal(tensor, trained[name]), name


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda root: root / "missing.ckpt", "checkpoint not found"),
        (lambda root: root, "not a DeepSpeed ZeRO checkpoint"),
    ],
)
def test_export_names_what_is_wrong_with_the_checkpoint(make, message, tmp_path, capsys):
    from cyclealign_pl.export import main as export_main

    path = make(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        export_main([str(path), str(tmp_path / "out")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and str(path) in err
    assert not (tmp_path / "out").exists()
