"""Crash and storage faults (issue 20): atomic checkpoints on a second filesystem, a run's identity and spend
across a crash before its first checkpoint, a lost or corrupt cache, an interrupted end of fit, full and
read-only disks, line numbers of bad data, unbounded sizes.

Faults are injected where they happen in life: a write that dies halfway (the process's own ``open`` patched
to stop mid-file), a tmpfs mounted as a second filesystem (root only; skipped with the reason elsewhere), a
full tmpfs, a read-only mount, a killed subprocess, a damaged SQLite file.
"""

from __future__ import annotations

import builtins
import gzip
import json
import os
import subprocess
import uuid
from pathlib import Path

import pytest
import torch

from cyclealign_pl import storage
from cyclealign_pl.cli import EXIT_BAD_INPUT, EXIT_STOPPED, main
from tests.helpers import cli_args

SHORT = (  # the CPU default, shortened: 4 prompts, a checkpoint after each
    "--trainer.limit_train_batches",
    "4",
    "--trainer.callbacks.every_n_batches",
    "1",
    "--data.init_args.num_train_prompts",
    "4",
)
FAST = (*SHORT, "--trainer.limit_val_batches", "0", "--model.reward_model", "null")  # and no evaluation


class SimulatedKill(BaseException):
    """The process dies here (a BaseException: no ``except Exception`` handler runs)."""


@pytest.fixture
def second_filesystem(tmp_path):
    """``mount(size) -> folder``: a tmpfs of ``size`` mounted under tmp_path (another filesystem than the
    temporary folder's), unmounted afterwards; skipped where this process may not mount."""
    mounted: list[Path] = []

    def mount(size: str = "64m") -> Path:
        if os.geteuid() != 0:
            pytest.skip("mounting a tmpfs needs root; the fault is the same on any second filesystem")
        point = tmp_path / f"fs-{len(mounted)}"
        point.mkdir()
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(point)],
            capture_output=True,
            text=True,
        )
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
        mounted.append(point)
        return point

    yield mount
    for point in mounted:
        subprocess.run(["umount", "-l", str(point)], check=False)


def die_halfway_through(monkeypatch, folder: Path, nth: int) -> list[str]:
    """Patch ``open`` so that the ``nth`` file opened for writing inside ``folder`` gets half of its first
    write (or nothing, for a copy by file descriptor) and then the process "dies". The paths opened."""
    real_open = builtins.open
    opened: list[str] = []

    class Dying:
        def __init__(self, f):
            self._f = f

        def write(self, data):
            self._f.write(bytes(data)[: max(1, len(data) // 2)])
            self._f.flush()
            raise SimulatedKill(f"killed while writing {self._f.name}")

        def fileno(self):  # shutil.copyfile copies with sendfile: the target is already truncated here
            raise SimulatedKill(f"killed while copying to {self._f.name}")

        def __getattr__(self, name):
            return getattr(self._f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self._f.close()

    def patched(file, mode="r", *args, **kwargs):
        f = real_open(file, mode, *args, **kwargs)
        if isinstance(file, (str, os.PathLike)) and any(c in mode for c in "wax"):
            path = Path(os.fspath(file)).resolve()
            if path.parent == folder.resolve():
                opened.append(path.name)
                if len(opened) == nth:
                    return Dying(f)
        return f

    monkeypatch.setattr(builtins, "open", patched)
    return opened


def steps_in(checkpoint: Path) -> int:
    return torch.load(checkpoint, weights_only=True)["cyclealign"]["counters"]["steps"]


# -- 1. atomic checkpoints ------------------------------------------------------------------------------


def test_atomic_write_leaves_the_old_file_or_the_new_one_never_a_partial_one(tmp_path, monkeypatch):
    target = tmp_path / "last.ckpt"
    storage.atomic_write(target, lambda f: f.write(b"old checkpoint"))
    die_halfway_through(monkeypatch, tmp_path, nth=1)
    with pytest.raises(SimulatedKill):
        storage.atomic_write(target, lambda f: f.write(b"new checkpoint, longer than the old one"))
    monkeypatch.undo()
    assert target.read_bytes() == b"old checkpoint"
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # the partial temporary file is gone
    storage.atomic_write(target, lambda f: f.write(b"new"))
    assert target.read_bytes() == b"new"


@pytest.mark.slow
def test_a_kill_halfway_through_writing_last_ckpt_on_a_second_filesystem_resumes(
    second_filesystem, monkeypatch, capsys
):
    """The run directory on a tmpfs: Lightning's own writer copies a temporary file from /tmp over
    ``last.ckpt``; a kill during the copy left it truncated and the resume crashed."""
    root = second_filesystem("64m") / "run"
    checkpoints = root / "checkpoints"
    checkpoints.mkdir(parents=True)
    # per save: epoch=0-step=N.ckpt, then last.ckpt; the 6th file opened is the third save's last.ckpt
    opened = die_halfway_through(monkeypatch, checkpoints, nth=6)
    with pytest.raises(SimulatedKill):
        main(["fit", *cli_args(root, *FAST)])
    monkeypatch.undo()
    assert len(opened) == 6
    assert steps_in(checkpoints / "last.ckpt") == 2  # the second save's, intact
    cli = main(["fit", *cli_args(root, *FAST, "--ckpt_path", "last")])
    assert cli.model.counters.steps == 4
    assert steps_in(checkpoints / "last.ckpt") == 4
    assert all(storage.TEMP_MARK not in p.name for p in checkpoints.iterdir())
    assert "Traceback" not in capsys.readouterr().err


@pytest.mark.slow
def test_last_ckpt_that_does_not_load_falls_back_to_the_newest_that_does(tmp_path, capsys):
    root = tmp_path / "run"
    main(["fit", *cli_args(root, *FAST, "--trainer.limit_train_batches", "2")])
    last = root / "checkpoints" / "last.ckpt"
    data = last.read_bytes()
    last.write_bytes(data[: len(data) // 2])  # what a kill under Lightning's own writer left
    capsys.readouterr()
    resume = ("--trainer.limit_train_batches", "2", "--trainer.max_epochs", "2", "--ckpt_path", "last")
    cli = main(["fit", *cli_args(root, *FAST, *resume)])
    err = capsys.readouterr().err
    fallback = [line for line in err.splitlines() if "newer checkpoints do not load" in line]
    assert len(fallback) == 1 and "epoch=0-step=" in fallback[0] and "last.ckpt (" in fallback[0]
    assert cli.model.counters.steps == 4  # the second epoch after the first one's checkpoint


@pytest.mark.slow
def test_a_full_disk_is_one_line_and_status_3_with_nothing_partial_left(second_filesystem, capsys):
    root = second_filesystem("3m") / "run"
    with pytest.raises(SystemExit) as stopped:
        main(["fit", *cli_args(root, *FAST)])
    assert stopped.value.code == EXIT_STOPPED
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("cyclealign_pl:")]
    assert len(lines) == 1 and "No space left on device" in lines[0] and str(root) in lines[0]
    assert "Traceback" not in err
    left = [p for p in (root / "checkpoints").iterdir()] if (root / "checkpoints").exists() else []
    for p in left:  # whatever is there loads; nothing truncated, no temporary file
        assert storage.TEMP_MARK not in p.name
        torch.load(p, weights_only=True)


# -- 3. a cache that existed and is now empty or corrupt ------------------------------------------------


@pytest.mark.parametrize("damage", ["empty", "garbage_in_the_middle"])
def test_an_empty_or_corrupt_cache_is_one_line_naming_it_and_how_to_go_on(damage, tmp_path, capsys):
    from cyclealign_pl.judges.cache import CachedReply, JudgeCache

    path = tmp_path / "judge_cache.sqlite"
    cache = JudgeCache(path)
    for i in range(300):
        cache.put(f"key-{i}", CachedReply("reply " * 50 + str(i), 10, 20))
    cache.close()
    if damage == "empty":
        path.write_bytes(b"")
        os.utime(path, (1e9, 1e9))  # emptied long ago, not being created by another process right now
    else:
        data = bytearray(path.read_bytes())
        middle = len(data) // 2
        data[middle : middle + 8192] = os.urandom(8192)
        path.write_bytes(bytes(data))
    args = cli_args(
        tmp_path / "run",
        *FAST,
        "--model.judge",
        "cyclealign_pl.judges.openai.OpenAIJudge",
        "--model.judge.init_args.model",
        "m",
        "--model.judge.init_args.base_url",
        "http://127.0.0.1:9/v1",
        "--model.judge.init_args.cache_path",
        str(path),
    )
    with pytest.raises(SystemExit) as refused:
        main(["fit", *args])
    assert refused.value.code == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert "Traceback" not in err and "DatabaseError" not in err
    lines = [line for line in err.splitlines() if line.startswith("cyclealign_pl:")]
    assert len(lines) == 1 and str(path) in lines[0]
    assert "--model.judge.init_args.cache_path" in lines[0] and "pay again" in lines[0]
    assert ("empty" if damage == "empty" else "corrupt") in lines[0]


def test_the_run_identity_is_fixed_in_the_run_directory_before_anything_is_spent(tmp_path):
    first = storage.run_identity(tmp_path, uuid.uuid4().hex)
    assert storage.run_identity(tmp_path, "another") == first  # a resume without a checkpoint keeps it
    assert storage.run_record(tmp_path)["run_id"] == first


# -- 2. the run's identity and budget across a crash before the first checkpoint ------------------------


@pytest.mark.slow
def test_a_budget_counts_every_request_of_the_run_across_a_kill_before_its_first_checkpoint(tmp_path):
    import signal

    from tests.openai_server import LocalOpenAIServer
    from tests.test_reliability import FitProcess, questions, write_hh

    data = write_hh(tmp_path / "hh", questions("budget", 24))
    run_dir = tmp_path / "run"
    budget = ("--model.judge.init_args.budget_requests", "12", "--trainer.callbacks.every_n_batches", "100")
    with LocalOpenAIServer() as server:
        killed = FitProcess(run_dir, data, server, "1-killed", *budget)
        killed.wait_for(lambda: len(server.requests) >= 8, "8 judge requests")
        os.kill(killed.proc.pid, signal.SIGKILL)
        assert killed.finish() == -signal.SIGKILL
        assert not (run_dir / "checkpoints").exists() or not list((run_dir / "checkpoints").iterdir())
        sent_before = len(server.requests)
        resumed = FitProcess(run_dir, data, server, "2-resumed", *budget, "--ckpt_path", "last")
        code = resumed.finish()
        total = len(server.requests)
    assert sent_before >= 8
    assert code == EXIT_STOPPED and "is spent" in resumed.output()
    assert total <= 12  # the budget of the run, not of each process
    assert storage.run_record(run_dir)["run_id"]


# -- 5 (data) and 6. a bad data row: its real line, one line and status 2 ---------------------------------


def hh_lines(count: int) -> list[bytes]:
    row = {"chosen": "\n\nHuman: hi\n\nAssistant: hello", "rejected": "\n\nHuman: hi\n\nAssistant: no"}
    return [json.dumps({**row, "chosen": row["chosen"] + f" {i}"}).encode() for i in range(count)]


@pytest.mark.parametrize("bad_line", [7, 50, 300])
def test_a_non_utf8_byte_is_reported_on_its_own_line(bad_line, tmp_path):
    from cyclealign_pl.data.beavertails import load_raw as load_beavertails
    from cyclealign_pl.data.hh_rlhf import scan_jsonl
    from cyclealign_pl.data.rows import DataFileError

    lines = hh_lines(400)
    lines[bad_line - 1] = lines[bad_line - 1].replace(b"hello", b"hell\xff")
    for name in ("test.jsonl", "test.jsonl.gz"):
        path = tmp_path / name
        content = b"\n".join(lines) + b"\n"
        path.write_bytes(gzip.compress(content) if name.endswith(".gz") else content)
        with pytest.raises(DataFileError, match=f"{name}, line {bad_line}: not UTF-8"):
            scan_jsonl(path)
    csv_rows = [b"prompt,category"] + [f'"question {i}",misc'.encode() for i in range(1, 400)]
    csv_rows[bad_line - 1] = b'"question \xff",misc'
    (tmp_path / "bt.csv").write_bytes(b"\n".join(csv_rows) + b"\n")
    with pytest.raises(DataFileError, match=f"bt.csv, line {bad_line}: not UTF-8"):
        load_beavertails(tmp_path / "bt.csv")


@pytest.mark.slow
def test_a_lone_surrogate_escape_in_a_data_row_names_its_line_and_exits_2(tmp_path, capsys):
    subset = tmp_path / "hh" / "harmless-base"
    subset.mkdir(parents=True)
    lines = hh_lines(6)
    lines[3] = lines[3].replace(b"hello", b"hel\\ud800lo")  # the JSON escape, valid JSON, not text
    (subset / "test.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    with pytest.raises(SystemExit) as refused:
        main(["fit", *cli_args(tmp_path / "run", *FAST, "--data.init_args.root", str(tmp_path / "hh"))])
    assert refused.value.code == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines_out = [line for line in err.splitlines() if line.startswith("cyclealign_pl:")]
    assert len(lines_out) == 1 and "test.jsonl, line 4: field 'chosen' holds a lone surrogate" in lines_out[0]


# -- 4. a kill during the final evaluation or the export --------------------------------------------------


@pytest.mark.slow
def test_a_kill_during_the_export_is_finished_by_the_resume_not_already_finished(
    tmp_path, monkeypatch, capsys
):
    """A resumed fit that ended its training saves an end-of-epoch checkpoint; a kill in its export left
    ``hf_model/`` with only ``config.json``, and the next resume said "already finished ... nothing to do"."""
    from cyclealign_pl.callbacks import ExportPretrained

    root = tmp_path / "run"
    evaluate = ("--trainer.limit_val_batches", "1", "--data.init_args.eval_batch_size", "4")
    args = cli_args(root, *FAST)

    def killed_export(self, pl_module, path):
        Path(path).mkdir(parents=True, exist_ok=True)
        (Path(path) / "config.json").write_text("{}")
        raise SimulatedKill("killed while exporting")

    monkeypatch.setattr(ExportPretrained, "_export", killed_export)
    with pytest.raises(SimulatedKill):
        main(["fit", *args])
    with pytest.raises(SimulatedKill):  # resumed: Lightning finishes the epoch, saves, exports: killed
        main(["fit", *args, "--ckpt_path", "last"])
    monkeypatch.undo()
    capsys.readouterr()
    resume = [*cli_args(root, *SHORT), *evaluate, "--ckpt_path", "last"]
    main(["fit", *resume])
    out, err = capsys.readouterr()
    assert "nothing to do" not in out + err
    assert "the training is finished but the fit did not reach its end: finishing it" in err
    exported = [p for p in root.glob("logs/version_*/hf_model") if (p / "model.safetensors").exists()]
    assert len(exported) == 1
    assert "fit done: 4 steps" in out and "evaluation on 4 prompts" in out  # the summary, the evaluation
    assert list(exported[0].parent.glob("eval/val_*"))
    with pytest.raises(SystemExit) as finished:  # now it has reached its end
        main(["fit", *resume])
    assert finished.value.code == 0
    out, err = capsys.readouterr()
    assert "already finished" in out and "nothing to do" in out


# -- 7. unbounded sizes ----------------------------------------------------------------------------------


def test_a_huge_judge_reply_is_cut_off_counted_as_a_failure_and_not_cached(tmp_path):
    from cyclealign_pl.judges.base import RankRequest
    from cyclealign_pl.judges.cache import JudgeCache
    from cyclealign_pl.judges.openai import OpenAIJudge
    from tests.openai_server import Behaviour, LocalOpenAIServer

    huge = "### The desired ranking is: [0, 1, 2]. " + "x" * (5 << 20)  # 5 MB
    cache = tmp_path / "cache.sqlite"
    with LocalOpenAIServer() as server:
        server.enqueue(Behaviour.reply(huge))
        judge = OpenAIJudge(
            model="local-ranker",
            base_url=server.url,
            max_retries=0,
            cache_path=str(cache),
            max_response_bytes=64 << 10,
        )
        judgment = judge.rank([RankRequest("\n\nHuman: hi\n\nAssistant:", ("a", "bb", "ccc"))])[0]
        metrics = judge.metrics()
        judge.close()
    assert judgment.ranking is None and "max_response_bytes=65536" in judgment.failure
    assert metrics["failures/too_large"] == 1
    assert len(JudgeCache(cache)) == 0 and cache.stat().st_size < 1 << 20


def test_the_judge_sees_a_long_prompt_as_trimmed_to_the_runs_budget(tmp_path):
    from tests.helpers import LongestFirstJudge
    from tests.test_reliability import fit, tiny_module, write_hh

    long_question = "Tell me everything about gardens. " * 2000 + "What about roses?"  # ~ 6k words
    data = write_hh(tmp_path / "hh", [long_question, "Short one?"])
    judge = LongestFirstJudge()
    module = tiny_module(judge)
    fit(module, data, tmp_path / "run", batches=2)
    assert module.counters.truncated_prompts == 1
    long_seen = [r for r in judge.requests if "roses" in r.instruction]
    assert long_seen and all(
        r.instruction == module.whitebox.visible_prompt(r.instruction) for r in long_seen
    )
    budget_bytes = module.whitebox.max_length * 4  # byte tokenizer: a token is at most a few bytes
    assert all(len(r.instruction.encode()) <= budget_bytes for r in long_seen)
    assert all(r.instruction.endswith("What about roses?\n\nAssistant:") for r in long_seen)
    demos = [d.instruction for r in judge.requests for d in r.demonstrations]
    assert all(len(d.encode()) <= budget_bytes for d in demos)


# -- 5. storage faults: a full disk under the logs, a read-only run directory or cache ----------------------


@pytest.mark.slow
def test_a_full_disk_while_writing_metrics_is_one_line_and_status_3_keeping_the_checkpoints(
    second_filesystem, capsys
):
    root = second_filesystem("64m") / "run"
    logs = root / "logs"
    logs.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=12k", "tmpfs", str(logs)], check=True)
    args = cli_args(
        root, *FAST, "--trainer.limit_train_batches", "8", "--data.init_args.num_train_prompts", "8"
    )
    args += ["--export.enabled", "false"]
    try:
        with pytest.raises(SystemExit) as stopped:
            main(["fit", *args, "--trainer.logger.init_args.flush_logs_every_n_steps", "1"])
        err = capsys.readouterr().err
    finally:
        subprocess.run(["umount", "-l", str(logs)], check=False)
    assert stopped.value.code == EXIT_STOPPED
    lines = [line for line in err.splitlines() if line.startswith("cyclealign_pl:")]
    assert len(lines) == 1 and "No space left on device" in lines[0] and str(logs) in lines[0], err[-2000:]
    assert "Traceback" not in err
    saved = list((root / "checkpoints").glob("*.ckpt"))
    assert saved and all(steps_in(p) >= 1 for p in saved)  # the checkpoints written before are intact


@pytest.mark.slow
@pytest.mark.parametrize("where", ["run_dir", "cache"])
def test_a_read_only_run_directory_or_cache_is_one_line_naming_it(where, second_filesystem, capsys):
    folder = second_filesystem("16m")
    cache = folder / "cache" / "judge_cache.sqlite"
    cache.parent.mkdir()
    if where == "cache":
        from cyclealign_pl.judges.cache import JudgeCache

        JudgeCache(cache).close()
    subprocess.run(["mount", "-o", "remount,ro", str(folder)], check=True)
    root = folder / "run" if where == "run_dir" else folder.parent / "run"
    args = cli_args(root, *FAST)
    if where == "cache":
        args += ["--model.judge", "cyclealign_pl.judges.openai.OpenAIJudge", "--model.judge.init_args.model"]
        args += ["m", "--model.judge.init_args.base_url", "http://127.0.0.1:9/v1"]
        args += ["--model.judge.init_args.cache_path", str(cache)]
    with pytest.raises(SystemExit) as refused:
        main(["fit", *args])
    err = capsys.readouterr().err
    assert refused.value.code in (EXIT_BAD_INPUT, EXIT_STOPPED)
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("cyclealign_pl:")]
    named = str(root) if where == "run_dir" else str(cache)
    assert len(lines) == 1 and named in lines[0] and "read-only" in lines[0].lower(), err[-2000:]


def test_metrics_csv_keeps_its_rows_when_a_rewrite_for_a_new_column_dies(tmp_path, monkeypatch):
    """Lightning truncates ``metrics.csv`` and writes it again when a column appears; a full disk or a kill
    at that moment lost every row before. The configs' logger rewrites it atomically."""
    logger = storage.CSVLogger(save_dir=str(tmp_path), name="logs")
    for step in range(3):
        logger.log_metrics({"train/loss": 1.0 / (step + 1)}, step=step)
        logger.save()
    metrics = Path(logger.experiment.metrics_file_path)
    before = metrics.read_bytes()
    die_halfway_through(monkeypatch, metrics.parent, nth=1)
    logger.log_metrics({"judge/requests_sent": 3.0}, step=3)  # a new column: the file is rewritten
    with pytest.raises(SimulatedKill):
        logger.save()
    monkeypatch.undo()
    assert metrics.read_bytes() == before
    assert [p.name for p in metrics.parent.iterdir() if storage.TEMP_MARK in p.name] == []
