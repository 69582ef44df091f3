"""Reliability (issue 7): crash-safe progress, guards, bad input, secrets, clean stops.

Fault injection against real parts: tiny models built from configs, the real CLI in subprocesses, and a real
OpenAI-compatible server (``LocalOpenAIServer``) started by the tests on 127.0.0.1. Nothing is mocked; faults
are injected where they happen in life (a killed process, a signal, a failing server, a NaN in the maths).
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import time
from collections.abc import Callable, Sequence
from datetime import timedelta
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Trainer

from cyclealign_pl.callbacks import CycleCheckpoint, CycleMetrics
from cyclealign_pl.cli import EXIT_BAD_INPUT, EXIT_STOPPED, main
from cyclealign_pl.cycle import CycleConfig
from cyclealign_pl.judges.base import Judge, RankRequest
from cyclealign_pl.judges.openai import OpenAIJudge
from cyclealign_pl.module import CycleAlignModule, RunStopped
from cyclealign_pl.policy import SamplingConfig, WhiteBox
from cyclealign_pl.settings import EvaluationConfig, WhiteBoxConfig
from cyclealign_pl.signals import StopRequest
from tests.helpers import (
    LongestFirstJudge,
    cli_args,
    fit_command,
    make_data,
    make_trainer,
    only_says_eos,
    write_hh_split,
)
from tests.helpers import tiny_module as helpers_tiny_module
from tests.openai_server import Behaviour, LocalOpenAIServer, failure_mix

ROOT = Path(__file__).resolve().parents[1]
TINY_OPENAI = ROOT / "configs" / "tiny_openai.yaml"
FAKE_KEY = "sk-cyclealign-FAKE-3c9e51d07ab2-never-on-disk"


def questions(prefix: str, count: int) -> list[str]:
    return [f"{prefix} question number {i}: how do I keep my plants alive?" for i in range(count)]


def write_hh(
    root: Path, train: Sequence[str], test: Sequence[str] = ("Which tea is best?", "Is rain wet?")
) -> Path:
    """HH-RLHF files (upstream layout) with distinct training and evaluation questions."""
    for split, qs in (("train", train), ("test", test)):
        pairs = [
            (f"\n\nHuman: {q}\n\nAssistant: Sure, glad to help.", f"\n\nHuman: {q}\n\nAssistant: No.")
            for q in qs
        ]
        write_hh_split(root, "harmless-base", split, pairs)
    return root


def tiny_module(
    judge: Judge, module_class: type[CycleAlignModule] = CycleAlignModule, **kwargs
) -> CycleAlignModule:
    options = dict(
        sampling=SamplingConfig(max_new_tokens=8),
        cycle=CycleConfig(max_iterations=2),
        whitebox=WhiteBoxConfig(max_length=96),
        evaluation=EvaluationConfig(max_new_tokens=8),
        module_class=module_class,
    )
    options.update(kwargs)
    return helpers_tiny_module(judge, **options)


def fit(
    module: CycleAlignModule,
    data_root: Path,
    run_dir: Path,
    batches: int,
    ckpt_path: str | None = None,
    **trainer_kwargs,
) -> Trainer:
    trainer = make_trainer(run_dir, batches, **trainer_kwargs)
    data = make_data(data_root, train_split="train", eval_split="test")
    trainer.fit(module, data, ckpt_path=ckpt_path)
    return trainer


def parameters(module: CycleAlignModule) -> list[torch.Tensor]:
    return [p.detach().clone() for p in module.model.parameters()]


def optimizer_tensors(module: CycleAlignModule) -> list[torch.Tensor]:
    state = module.optimizers().optimizer.state
    return [t.detach().clone() for s in state.values() for t in s.values() if isinstance(t, torch.Tensor)]


def same(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


# -- 1. crash-safe progress: exact resume in-process ------------------------------------------------------


def test_a_resumed_run_continues_exactly_where_its_checkpoint_left(tmp_path):
    """Resume mid-epoch (of the second epoch): same prompts in the same order, bit-identical final weights.

    Bit-identical weights need the data position, the optimizer, the demonstration pool *and* the RNG states
    restored: the resumed steps sample the very candidates the uninterrupted run sampled.
    """
    data = write_hh(tmp_path / "hh", questions("resume", 6))
    judge_a = LongestFirstJudge()
    whole = tiny_module(judge_a, cycle=CycleConfig(max_iterations=2, demonstration_scope="run"))
    saver = CycleCheckpoint(dirpath=tmp_path / "ckpt", every_n_batches=2, save_top_k=-1, save_last=True)
    fit(whole, data, tmp_path / "a", batches=3, max_epochs=2, enable_checkpointing=True, callbacks=[saver])
    assert whole.counters.steps == 6 and len(whole.trained_ids) == 6
    first_epoch, second_epoch = whole.trained_ids[:3], whole.trained_ids[3:]
    assert first_epoch != second_epoch  # each epoch has its own (seeded) order

    saved = {
        torch.load(p, weights_only=True)["cyclealign"]["counters"]["steps"]: p
        for p in (tmp_path / "ckpt").glob("epoch=*.ckpt")
    }
    assert sorted(saved) == [2, 3, 4, 6]  # every 2 training steps (whatever the optimizer steps) + epoch ends
    judge_b = LongestFirstJudge()
    resumed = tiny_module(judge_b, cycle=CycleConfig(max_iterations=2, demonstration_scope="run"))
    fit(resumed, data, tmp_path / "b", batches=3, max_epochs=2, ckpt_path=str(saved[4]))

    assert resumed.trained_ids == whole.trained_ids
    assert resumed.counters == whole.counters
    assert judge_b.requests == judge_a.requests[-len(judge_b.requests) :]  # the same requests, none repeated
    assert same(parameters(resumed), parameters(whole))


def test_checkpoints_by_time_as_well_as_by_steps(tmp_path):
    data = write_hh(tmp_path / "hh", questions("timed", 3))
    every_batch = CycleCheckpoint(dirpath=tmp_path / "timed", train_time_interval=timedelta(0), save_top_k=-1)
    module = tiny_module(LongestFirstJudge())
    fit(module, data, tmp_path / "run", batches=3, enable_checkpointing=True, callbacks=[every_batch])
    steps = sorted(
        torch.load(p, weights_only=True)["cyclealign"]["counters"]["steps"]
        for p in (tmp_path / "timed").glob("*.ckpt")
    )
    assert steps == [1, 2, 3]

    hourly = CycleCheckpoint(
        dirpath=tmp_path / "hourly", train_time_interval=timedelta(hours=1), save_top_k=-1
    )
    fit(
        tiny_module(LongestFirstJudge()),
        data,
        tmp_path / "run2",
        batches=3,
        enable_checkpointing=True,
        callbacks=[hourly],
    )
    assert len(list((tmp_path / "hourly").glob("*.ckpt"))) == 1  # only the end of the epoch


def test_checkpoint_settings_that_cannot_work_are_refused():
    with pytest.raises(ValueError, match="every_n_batches must be >= 1"):
        CycleCheckpoint(every_n_batches=0)
    with pytest.raises(ValueError, match="every_n_train_steps"):
        CycleCheckpoint(every_n_train_steps=5)


# -- 1, 4, 5. kill -9, SIGTERM, Ctrl-C and the API key: the real CLI in subprocesses ------------------------

N_PROMPTS = 24
BATCH = 3  # continuous batching: prompts are in flight across steps, and so across checkpoints


def _default_sigint() -> None:
    """A background job (``cmd &`` without job control) starts with SIGINT ignored, and Python then installs
    no KeyboardInterrupt handler: give the fit the default, as a terminal's Ctrl-C finds it."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class FitProcess:
    """``python -m cyclealign_pl fit`` in a subprocess; its output goes to a log file inside the run
    directory."""

    def __init__(
        self, run_dir: Path, data_root: Path, server: LocalOpenAIServer, name: str, *extra: str
    ) -> None:
        command = fit_command(
            run_dir,
            "--config",
            str(TINY_OPENAI),
            "--trainer.callbacks.every_n_batches",
            "3",
            "--trainer.limit_val_batches",
            "0",
            "--trainer.limit_train_batches",
            str(N_PROMPTS // BATCH),
            "--model.reward_model",
            "null",
            "--data.init_args.batch_size",
            str(BATCH),
            "--model.sampling.max_new_tokens",
            "12",
            "--model.cycle.max_iterations",
            "2",
            "--model.judge.init_args.base_url",
            server.url,
            "--model.judge.init_args.cache_path",
            str(run_dir / "judge_cache.sqlite"),
            "--data.init_args.root",
            str(data_root),
            "--data.init_args.train_split",
            "train",
            "--data.init_args.num_train_prompts",
            "null",
            "--data.init_args.eval_prompts_per_subset",
            "2",
            *extra,
        )
        env = {**os.environ, "OPENAI_API_KEY": FAKE_KEY, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
        self.log_path = run_dir / f"{name}.log"
        run_dir.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            command,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=ROOT,
            preexec_fn=_default_sigint,  # Ctrl-C reaches it even when the tests run as a background job
        )

    def wait_for(self, condition: Callable[[], bool], what: str, limit_s: float = 600) -> None:
        """Poll until ``condition()``; fail with the log if the process ends first (``limit_s``: a safety
        net)."""
        deadline = time.monotonic() + limit_s
        while not condition():
            if self.proc.poll() is not None:
                pytest.fail(
                    f"the fit ended (status {self.proc.returncode}) before {what}:\n{self.output()[-3000:]}"
                )
            if time.monotonic() > deadline:
                self.proc.kill()
                pytest.fail(f"no {what} after {limit_s} s:\n{self.output()[-3000:]}")
            time.sleep(0.05)

    def finish(self) -> int:
        code = self.proc.wait(timeout=900)
        self._log.close()
        return code

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")


def cached_replies(path: Path) -> int:
    if not path.exists():
        return 0
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as conn:
        return int(conn.execute("SELECT COUNT(*) FROM replies").fetchone()[0])


def kill_between_requests(fit_process: FitProcess, server: LocalOpenAIServer, cache: Path) -> None:
    """SIGKILL at a moment when every request the server received has its reply in the cache.

    The process is frozen (SIGSTOP) first and inspected; a request in flight at a kill has no reply to cache
    and would be sent again on the rerun, which is unavoidable and not what this test is about.
    """
    pid = fit_process.proc.pid
    while True:
        assert fit_process.proc.poll() is None, "the fit finished before it could be killed"
        os.kill(pid, signal.SIGSTOP)
        time.sleep(0.3)  # let bytes already sent reach the server before comparing
        if cached_replies(cache) == len(server.requests):
            break
        os.kill(pid, signal.SIGCONT)
        time.sleep(0.02)
    os.kill(pid, signal.SIGKILL)
    os.kill(pid, signal.SIGCONT)


@pytest.fixture(scope="module")
def interrupted_run(tmp_path_factory):
    """One training run interrupted three ways, each time resumed with ``--ckpt_path last``:

    1. ``kill -9`` once a checkpoint exists and steps after it are done; 2. SIGTERM; 3. Ctrl-C (SIGINT);
    4. a last resume that finishes. The server and the fake API key are the same throughout.
    """
    base = tmp_path_factory.mktemp("interrupted")
    data = write_hh(base / "hh", questions("interrupted", N_PROMPTS))
    run_dir = base / "run"
    cache = run_dir / "judge_cache.sqlite"
    last = run_dir / "checkpoints" / "last.ckpt"
    result: dict[str, object] = {"run_dir": run_dir, "data": data}
    with LocalOpenAIServer() as server:
        killed = FitProcess(run_dir, data, server, "1-killed")
        killed.wait_for(last.exists, "a first checkpoint")
        after_checkpoint = len(server.requests)
        # the next checkpoint is 3 steps away: the kill lands before it, with work after the last one to redo
        killed.wait_for(lambda: len(server.requests) > after_checkpoint, "a request after the checkpoint")
        kill_between_requests(killed, server, cache)
        result["killed"] = (
            killed.finish(),
            torch.load(last, weights_only=True)["cyclealign"]["counters"]["steps"],
            len(server.requests),
        )

        for name, signum in (("2-sigterm", signal.SIGTERM), ("3-sigint", signal.SIGINT)):
            stopped = FitProcess(run_dir, data, server, name, "--ckpt_path", "last")
            seen = len(server.requests)
            stopped.wait_for(
                lambda seen=seen: len(server.requests) >= seen + 2, "new requests after resuming"
            )
            stopped.proc.send_signal(signum)
            result[name] = (stopped.finish(), stopped.output())

        final = FitProcess(run_dir, data, server, "4-finished", "--ckpt_path", "last")
        result["finished"] = (final.finish(), final.output())
        result["requests"] = server.requests
    result["state"] = torch.load(last, weights_only=True)["cyclealign"]
    return result


@pytest.mark.slow
def test_kill_9_and_resume_does_every_step_exactly_once(interrupted_run):
    code, steps_at_checkpoint, _requests_at_kill = interrupted_run["killed"]
    assert code == -signal.SIGKILL
    assert steps_at_checkpoint >= 3
    finished_code, output = interrupted_run["finished"]
    assert finished_code == 0, output[-3000:]
    state = interrupted_run["state"]
    trained = state["trained_ids"]
    expected = {f"harmless-base:train:{line}" for line in range(1, N_PROMPTS + 1)}
    assert len(trained) == N_PROMPTS and set(trained) == expected  # each prompt exactly once
    assert state["counters"]["steps"] == N_PROMPTS // BATCH and state["counters"]["prompts"] == N_PROMPTS
    # the steps redone after the kill were answered from the persistent cache, not by the server
    assert state["judge"]["counters"]["cache_hits"] >= 1


@pytest.mark.slow
def test_no_request_reaches_the_judge_server_twice(interrupted_run):
    bodies = [json.dumps(r.body, sort_keys=True) for r in interrupted_run["requests"]]
    assert len(bodies) >= N_PROMPTS
    assert len(set(bodies)) == len(bodies)


@pytest.mark.slow
@pytest.mark.parametrize(
    "phase, reason", [("2-sigterm", "received SIGTERM"), ("3-sigint", "received SIGINT")]
)
def test_a_signal_stops_cleanly_with_a_checkpoint_and_status_3(interrupted_run, phase, reason):
    code, output = interrupted_run[phase]
    assert code == EXIT_STOPPED, output[-3000:]
    last = interrupted_run["run_dir"] / "checkpoints" / "last.ckpt"
    assert f"cyclealign_pl: {reason}" in output
    assert f"A checkpoint was saved to {last}; resume with --ckpt_path {last}" in output
    assert "Traceback" not in output
    # a resumed run's screen: where it resumed, no warnings about what the run handles itself (in run.log)
    assert f"cyclealign_pl: resuming from {last} (" in output
    for noise in ("weights_only", "exists and is not empty", "GPU available", "LeafSpec"):
        assert noise not in output, noise


@pytest.mark.slow
def test_the_api_key_is_used_but_never_written_to_any_file(interrupted_run):
    requests = interrupted_run["requests"]
    assert all(r.headers.get("authorization") == f"Bearer {FAKE_KEY}" for r in requests)  # it was really used
    run_dir: Path = interrupted_run["run_dir"]
    files = [p for p in run_dir.rglob("*") if p.is_file()]
    kinds = {p.suffix for p in files} | {p.name for p in files}
    # what is searched: checkpoints, hparams + config dumps, metrics, logs, the cache (with WAL), exported
    # model
    assert {".ckpt", ".yaml", ".csv", ".log", ".sqlite", ".safetensors"} <= kinds
    key = FAKE_KEY.encode()
    leaks = [str(p) for p in files if key in p.read_bytes() or key.hex().encode() in p.read_bytes()]
    assert leaks == []


def test_a_spent_judge_budget_stops_with_a_resumable_checkpoint(tmp_path):
    data = write_hh(tmp_path / "hh", questions("budget", 4))
    with LocalOpenAIServer() as server:
        judge = OpenAIJudge(model="local-ranker", base_url=server.url, budget_requests=3)
        module = tiny_module(judge)
        saver = CycleCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
        with pytest.raises(RunStopped, match="the judge stopped the run: .*is spent") as stopped:
            fit(module, data, tmp_path / "run", batches=4, enable_checkpointing=True, callbacks=[saver])
        assert len(server.requests) == 3  # not one request over the budget
    last = tmp_path / "ckpt" / "last.ckpt"
    assert f"A checkpoint was saved to {last}; resume with --ckpt_path {last}" in str(stopped.value)
    state = torch.load(last, weights_only=True)["cyclealign"]
    assert state["judge"]["counters"]["requests_sent"] == 3  # the spent budget survives a resume
    assert state["counters"]["steps"] == len(state["trained_ids"]) == module.counters.steps


def test_the_first_ctrl_c_is_a_stop_request_the_second_interrupts():
    before = signal.getsignal(signal.SIGINT)
    request = StopRequest()
    request.install()
    try:
        signal.raise_signal(signal.SIGINT)
        assert request.reason == "received SIGINT (Ctrl-C)"
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)
    finally:
        request.uninstall()
    assert signal.getsignal(signal.SIGINT) is before


# -- 2. guards: non-finite updates, empty and degenerate candidates, long prompts -------------------------


class PoisonedUpdate(CycleAlignModule):
    """Makes one optimizer update non-finite (its loss, or one parameter's gradient) and records around it."""

    poison: str = "loss"
    poison_after: int = 1  # real updates before the poisoned one

    def _update(self, loss):
        done = getattr(self, "_updates_seen", 0)
        if loss is None or done != self.poison_after or getattr(self, "record", None) is not None:
            self._updates_seen = done + (loss is not None)
            return super()._update(loss)
        self._updates_seen = done + 1
        before, state_before = parameters(self), optimizer_tensors(self)
        hook = None
        if self.poison == "loss":
            loss = loss * float("nan")
        else:
            hook = self.model.get_input_embeddings().weight.register_hook(
                lambda g: torch.full_like(g, float("inf"))
            )
        applied = super()._update(loss)
        if hook is not None:
            hook.remove()
        self.record = (applied, same(before, parameters(self)), same(state_before, optimizer_tensors(self)))
        return applied


@pytest.mark.parametrize("poison", ["loss", "gradient"])
def test_a_non_finite_update_is_skipped_counted_and_logged(poison, tmp_path, caplog):
    data = write_hh(tmp_path / "hh", questions("nan", 4))
    module = tiny_module(LongestFirstJudge(), PoisonedUpdate)
    module.poison = poison
    initial = parameters(module)
    trainer = fit(module, data, tmp_path / "run", batches=3, callbacks=[CycleMetrics()])
    applied, weights_unchanged, optimizer_unchanged = module.record
    assert not applied and weights_unchanged and optimizer_unchanged
    assert module.counters.nonfinite_updates == 1
    assert trainer.global_step == module.counters.optimizer_steps >= 1  # the other updates did happen ...
    assert not same(initial, parameters(module))  # ... and changed the weights
    assert all(torch.isfinite(p).all() for p in module.model.parameters())
    assert trainer.callback_metrics["counters/nonfinite_updates"].item() == 1
    assert any("non-finite" in r.getMessage() for r in caplog.records)


def test_empty_generations_and_degenerate_candidate_sets_are_counted_not_judged(tmp_path):
    """A white-box that can only say EOS: every candidate is empty, every set has one distinct reply. Such a
    set is not sent to the judge and ends the prompt (nothing to rank: the white box is sure); it is
    counted."""
    from cyclealign_pl.summary import collect, render

    data = write_hh(tmp_path / "hh", questions("empty", 3))
    judge = LongestFirstJudge()
    module = only_says_eos(tiny_module(judge))
    trainer = fit(module, data, tmp_path / "run", batches=3, callbacks=[CycleMetrics()])
    c = module.counters
    assert c.steps == 3 and c.iterations == 3  # one each: a degenerate set ends the prompt
    assert c.degenerate_sets == 3 and c.empty_candidates == 9
    # sample collapse is counted apart from agreement, per step and at the end of the fit
    assert c.identical_sample_prompts == 3 and c.agreed_prompts == 0
    logged = trainer.callback_metrics
    assert logged["cycle/identical_samples"].item() == 1 and logged["cycle/agreement"].item() == 0
    assert (
        "0 ended by agreement, 3 on identical samples, 0 at the iteration limit"
        in render(collect(module, logged, {}))[0]
    )
    assert c.judge_failures == 0 and judge.requests == []  # never sent, so never a judge failure
    assert c.optimizer_steps == 0 and trainer.global_step == 0
    assert trainer.callback_metrics["counters/degenerate_sets"].item() == 3


def test_prompts_longer_than_the_budget_keep_their_last_tokens_and_are_counted(tmp_path):
    long_question = "Tell me everything about gardens. " * 20 + "What about roses?"
    data = write_hh(tmp_path / "hh", [long_question, "Short one?"])
    module = tiny_module(LongestFirstJudge())
    fit(module, data, tmp_path / "run", batches=2)
    assert module.counters.truncated_prompts == 1

    whitebox: WhiteBox = module.whitebox
    prompt = f"\n\nHuman: {long_question}\n\nAssistant:"
    kept = whitebox.prompt_ids(prompt)
    all_ids = module.tokenizer(prompt, add_special_tokens=False).input_ids
    assert whitebox.prompt_overflow(prompt) == len(all_ids) - len(kept) > 0
    assert module.tokenizer.decode(kept).endswith("What about roses?\n\nAssistant:")


# -- 2. a flaky judge server: every kind of failure is absorbed and counted ------------------------------


@pytest.mark.parametrize("kind", ["429", "500", "timeout", "drop", "garbage", "invalid_reply"])
def test_each_kind_of_judge_failure_is_absorbed_and_counted(kind, tmp_path):
    data = write_hh(tmp_path / "hh", questions(f"flaky {kind}", 4))
    failures = (
        (Behaviour.reply("They all look fine to me."),)
        if kind == "invalid_reply"
        else failure_mix([kind], 1.5)
    )
    with LocalOpenAIServer(failure_rate=0.4, failure=failures, seed=7) as server:
        judge = OpenAIJudge(
            model="local-ranker",
            base_url=server.url,
            request_timeout=0.5,
            max_retries=2,
            backoff_initial_s=0.01,
            backoff_max_s=0.02,
            cache_path=str(tmp_path / "cache.sqlite"),
        )
        module = tiny_module(judge)
        trainer = fit(module, data, tmp_path / "run", batches=4, callbacks=[CycleMetrics()])
        failed = [r for r in server.requests if r.behaviour != "rank"]
    m = judge.metrics()
    assert module.counters.steps == 4  # the run finished
    assert failed, "the server should have failed some requests"
    retried = kind in ("429", "500", "timeout", "drop")
    # every failed attempt was either retried or became a counted, masked failure of its prompt
    assert m["retries"] + m["failures"] == len(failed) if retried else m["retries"] == 0
    if not retried:
        reason = "bad_response" if kind == "garbage" else "invalid_reply"
        assert m[f"failures/{reason}"] == m["failures"] == len(failed)
    assert module.counters.judge_failures == m["failures"] + module.counters.degenerate_sets
    assert trainer.callback_metrics["judge/failures"].item() == m["failures"]


# -- 3. bad input: a clear message naming what is wrong, before any work or as a clean exit -----------------


@pytest.mark.parametrize(
    "override, message",
    [
        (["--model.cycle.num_candidates", "1"], "num_candidates (l) must be >= 2"),
        (["--model.cycle.max_iterations", "0"], "max_iterations (N) must be >= 1"),
        (["--model.cycle.bogus_knob", "1"], "bogus_knob"),
        (["--model.whitebox.max_length", "many"], "max_length"),
        (["--model.sampling.max_new_tokens", "0"], "sampling.max_new_tokens must be >= 1"),
        (["--model.whitebox.max_length", "40"], "max_length=40 leaves no room for a prompt"),
        (["--data.init_args.batch_size", "0"], "batch_size must be >= 1"),
        (["--data.init_args.root", "/no/such/hh"], "HH-RLHF root directory not found: /no/such/hh"),
        (["--trainer.callbacks.every_n_batches", "0"], "every_n_batches must be >= 1"),
        (["--model.tokenizer", "/no/such/tokenizer"], "could not load tokenizer '/no/such/tokenizer'"),
        (
            [
                "--model.reward_model.init_args.config",
                "null",
                "--model.reward_model.init_args.model",
                "/no/such/rm",
            ],
            "could not load reward model '/no/such/rm'",
        ),
        (
            ["--config", str(TINY_OPENAI), "--model.judge.init_args.max_retries", "-1"],
            "max_retries must be >= 0",
        ),
    ],
)
def test_bad_configuration_is_refused_before_any_work(override, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *cli_args(tmp_path / "run", *override)])
    assert exit_info.value.code == EXIT_BAD_INPUT  # argparse's usage-error status, like bad data
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run" / "checkpoints").exists()


def bad_rows(kind: str) -> str:
    ok = json.dumps(
        {"chosen": "\n\nHuman: hi\n\nAssistant: hello", "rejected": "\n\nHuman: hi\n\nAssistant: no"}
    )
    return {
        "invalid_json": ok + '\n{"chosen": oops\n',
        "not_an_object": ok + "\n[1, 2]\n",
        "wrong_type": ok + '\n{"chosen": 3, "rejected": "x"}\n',
        "no_fields": '{"question": "hi"}\n{"prompt": "there"}\n',
        "empty_prompts": json.dumps(
            {"chosen": "\n\nHuman: \n\nAssistant: a", "rejected": "\n\nHuman:\n\nAssistant: b"}
        ),
        "empty_file": "\n",
    }[kind]


@pytest.mark.parametrize(
    "kind, message",
    [
        ("invalid_json", "test.jsonl, line 2: invalid JSON"),
        ("not_an_object", "test.jsonl, line 2: expected a JSON object, got list"),
        ("wrong_type", "test.jsonl, line 2: field 'chosen' must be a string, got int"),
        ("no_fields", "test.jsonl: no usable rows: all 2 were dropped {'missing_field': 2}"),
        ("empty_prompts", "test.jsonl: no usable rows: all 1 were dropped {'empty_prompt': 1}"),
        ("empty_file", "test.jsonl: no rows (the file is empty)"),
        ("missing_file", "HH-RLHF file not found:"),
        ("corrupt_gzip", "test.jsonl.gz, line 1: cannot read"),
    ],
)
def test_bad_data_ends_the_run_with_a_message_naming_file_and_line(kind, message, tmp_path, capsys):
    subset = tmp_path / "hh" / "harmless-base"
    subset.mkdir(parents=True)
    if kind == "corrupt_gzip":
        (subset / "test.jsonl.gz").write_bytes(b"\x1f\x8b\x08\x00 this is not gzip data")
    elif kind != "missing_file":
        (subset / "test.jsonl").write_text(bad_rows(kind))
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *cli_args(tmp_path / "run", "--data.init_args.root", str(tmp_path / "hh"))])
    assert exit_info.value.code == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert "cyclealign_pl: bad input: " in err and str(subset) in err and message in err
    assert "Traceback" not in err


def test_judge_replies_without_a_valid_ranking_are_counted_failures_with_their_reason(tmp_path):
    replies = [
        "I like all of them.",
        "### The desired ranking is: [0, 0, 1].",
        "### The desired ranking is: [2, 1, 0].",
    ]
    with LocalOpenAIServer() as server:
        server.enqueue(*(Behaviour.reply(r) for r in replies))
        judge = OpenAIJudge(model="local-ranker", base_url=server.url, max_retries=0)
        request = RankRequest("\n\nHuman: hi\n\nAssistant:", ("a", "bb", "ccc"))
        judgments = [judge.rank([request])[0] for _ in replies]
        judge.close()
    assert [j.ranking for j in judgments] == [None, None, (2, 1, 0)]
    assert all(j.failure.startswith("invalid reply:") for j in judgments[:2])
    assert judge.metrics()["invalid_replies"] == 2 and judge.metrics()["failures/invalid_reply"] == 2
