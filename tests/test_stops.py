"""Where a run stops: a stop inside a training step (an epoch's last included) is resumed without losing the
prompts in flight, and ``trainer.max_steps`` is exact (issue 19, items 6 and 7)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from cyclealign_pl import summary
from cyclealign_pl.callbacks import CycleCheckpoint
from cyclealign_pl.cycle import CycleConfig
from cyclealign_pl.judges.base import Judgment, RankRequest
from cyclealign_pl.module import RunStopped
from cyclealign_pl.signals import EXIT_STOPPED, StopDeadline, sigterm_as_a_flag_only
from tests.helpers import QUESTIONS, WhiteBoxMirrorJudge, make_data, make_trainer, swap_top_two, tiny_module

NEVER_DONE_EARLY = CycleConfig(max_iterations=3)  # the judge below never agrees: every prompt takes 3 rounds


class SigtermAtCall(WhiteBoxMirrorJudge):
    """Mirrors the white box, swapped at the top (never agrees). At its ``at``-th call it flags SIGTERM on
    the trainer, as Lightning's handler does for a signal that arrives during that round."""

    def __init__(self, at: int | None = None) -> None:
        super().__init__(swap_top_two)
        self.at = at
        self.calls = 0
        self.trainer = None

    def rank(self, requests: Sequence[RankRequest]) -> list[Judgment]:
        self.calls += 1
        if self.calls == self.at:
            self.trainer._signal_connector.received_sigterm = True  # what its SIGTERM handler sets
        return super().rank(requests)


def checkpointed(root, **kwargs):
    saver = CycleCheckpoint(dirpath=root / "checkpoints", save_last=True)
    return make_trainer(root, enable_checkpointing=True, callbacks=[saver], **kwargs)


def weights(module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in module.model.parameters()]


def test_a_stop_in_an_epochs_last_step_is_resumed_and_its_prompts_in_flight_finish(hh_root, tmp_path):
    """2 steps of 3 prompts; SIGTERM in the first round of the last step leaves 3 prompts in flight at 1 of
    3 iterations. The resumed run redoes that step: it finishes them, and ends as the uninterrupted run did,
    bit for bit."""
    root = hh_root(QUESTIONS[:8])  # 6 training prompts: 2 of the first 4 are held out for evaluation
    whole_judge = SigtermAtCall()
    whole = tiny_module(whole_judge, cycle=NEVER_DONE_EARLY)
    make_trainer(tmp_path / "whole", batches=2).fit(whole, make_data(root, batch_size=3))
    assert whole.counters.steps == 2 and whole.counters.prompts == 6

    judge = SigtermAtCall(at=4)  # rounds 1-3: the first step; round 4: the first of the last step
    stopped = tiny_module(judge, cycle=NEVER_DONE_EARLY)
    trainer = judge.trainer = checkpointed(tmp_path / "run", batches=2)
    with pytest.raises(RunStopped, match="received SIGTERM"):
        trainer.fit(stopped, make_data(root, batch_size=3))
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    saved = torch.load(last, weights_only=True)["cyclealign"]
    assert [len(slot["iterations"]) for slot in saved["processes"][0]["cycle"]["slots"]] == [1, 1, 1]
    assert saved["counters"]["steps"] == 1 and saved["counters"]["prompts"] == 3

    resumed_judge = SigtermAtCall()
    resumed = tiny_module(resumed_judge, cycle=NEVER_DONE_EARLY)
    checkpointed(tmp_path / "run", batches=2).fit(resumed, make_data(root, batch_size=3), ckpt_path=last)
    assert resumed.run_state.in_flight() == 0
    assert resumed.trained_ids == whole.trained_ids
    assert resumed.counters == replace(whole.counters, interrupted_steps=1)
    assert resumed_judge.calls == 2  # the last 2 rounds of the 3 prompts, none asked twice
    assert resumed_judge.requests == whole_judge.requests[-len(resumed_judge.requests) :]
    assert all(torch.equal(a, b) for a, b in zip(weights(resumed), weights(whole)))
    newest = max(last.parent.glob("last*.ckpt"), key=lambda p: p.stat().st_mtime)  # what "last" resumes
    final = torch.load(newest, weights_only=True)["cyclealign"]
    assert final["counters"]["prompts"] == 6 and not any(final["processes"][0]["cycle"]["slots"])


def test_max_steps_stops_at_exactly_that_many_optimizer_steps_and_keeps_the_prompts_in_flight(
    hh_root, tmp_path
):
    root = hh_root(QUESTIONS[:8])
    module = tiny_module(WhiteBoxMirrorJudge(swap_top_two), cycle=CycleConfig(max_iterations=5))
    trainer = checkpointed(tmp_path, batches=4, max_steps=3)
    trainer.fit(module, make_data(root, batch_size=2))
    assert trainer.global_step == 3 and module.counters.optimizer_steps == 3
    assert module.counters.prompts == 0 and module.totals.in_flight == 2
    saved = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["cyclealign"]
    assert saved["counters"]["optimizer_steps"] == 3
    assert [len(slot["iterations"]) for slot in saved["processes"][0]["cycle"]["slots"]] == [3, 3]
    report = summary.render(summary.collect(module, trainer.callback_metrics, {}))
    assert "2 prompts still in flight at the end of training: saved in the checkpoint" in "\n".join(report)

    # a larger max_steps goes on in the same epoch: the prompts in flight, then the batches not yet taken
    resumed = tiny_module(WhiteBoxMirrorJudge(swap_top_two), cycle=CycleConfig(max_iterations=5))
    trainer = checkpointed(tmp_path, batches=4, max_steps=6)
    trainer.fit(resumed, make_data(root, batch_size=2), ckpt_path=str(tmp_path / "checkpoints" / "last.ckpt"))
    assert trainer.global_step == 6 and resumed.counters.optimizer_steps == 6
    assert resumed.counters.steps > module.counters.steps and resumed.counters.prompts >= 2


def test_a_process_that_does_not_act_on_a_stop_signal_exits_after_the_grace_period():
    """The SIGTERM handler only sets a flag that nothing reads (as in a process blocked in a collective): the
    deadline's own thread ends the process, with the stop status and a message, once the grace period is
    over."""
    script = textwrap.dedent(
        """
        import signal, threading
        from cyclealign_pl.signals import StopDeadline
        signal.signal(signal.SIGTERM, lambda *_: None)
        StopDeadline(1.0, 3, "gave up after {grace_s:g} s").arm()
        print("ready", flush=True)
        threading.Event().wait()
        """
    )
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )
    assert proc.stdout.readline().strip() == "ready"
    signalled = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_STOPPED == 3
    assert "gave up after 1 s" in err
    assert time.monotonic() - signalled >= 1.0


def test_a_deadline_passes_signals_on_to_the_previous_wakeup_fd_and_gives_it_back():
    """Whoever watched the wakeup fd before (an asyncio loop, a notebook kernel) still sees every signal while
    the deadline is armed, and has the fd back after ``disarm``; a signal it does not watch starts no
    clock."""
    import select

    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)
    handler = signal.signal(signal.SIGUSR1, lambda *_: None)
    previous = signal.set_wakeup_fd(write_fd)
    try:
        deadline = StopDeadline(0.1, EXIT_STOPPED, "")
        deadline.arm()
        os.kill(os.getpid(), signal.SIGUSR1)
        assert select.select([read_fd], [], [], 10)[0], "the signal was not passed on"
        assert os.read(read_fd, 16) == bytes([signal.SIGUSR1])
        deadline.disarm()
        assert signal.set_wakeup_fd(-1) == write_fd
        time.sleep(0.3)  # past the grace period: nothing ends the process
    finally:
        signal.set_wakeup_fd(previous)
        signal.signal(signal.SIGUSR1, handler)
        os.close(read_fd)
        os.close(write_fd)


def test_under_ddp_sigterm_sets_the_flag_and_passes_the_signal_on_without_a_collective():
    """Lightning's handler would broadcast from inside the handler (no process group here: it would fail);
    this one sets the trainer's flag and passes SIGTERM on to the launched processes, once."""
    from types import SimpleNamespace

    passed_on: list[int] = []
    connector = SimpleNamespace(received_sigterm=False)
    launcher = SimpleNamespace(kill=passed_on.append)
    trainer = SimpleNamespace(
        world_size=2, _signal_connector=connector, strategy=SimpleNamespace(launcher=launcher)
    )
    previous = signal.getsignal(signal.SIGTERM)
    try:
        sigterm_as_a_flag_only(trainer)
        for _ in range(2):
            signal.raise_signal(signal.SIGTERM)
        assert connector.received_sigterm and passed_on == [signal.SIGTERM]
    finally:
        signal.signal(signal.SIGTERM, previous)
    single = SimpleNamespace(world_size=1)
    sigterm_as_a_flag_only(single)  # one process: Lightning's own handler stays
    assert signal.getsignal(signal.SIGTERM) is previous
