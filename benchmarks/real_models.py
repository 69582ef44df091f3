r"""CycleAlign with real language models, offline: what the run does and what it costs on this machine.

The setting is ``configs/smollm2.yaml`` (SmolLM2-135M-Instruct as the white box, the same GGUF behind
llama.cpp's OpenAI-compatible server as the judge) with the evaluator trained on human labels
(``configs/eval/human_rm.yaml``: a frozen MiniLM sentence encoder with a reward head trained on HH-RLHF
harmless-base pairs that no run's prompt comes from). Printed:

1. on the evaluation prompts' own chosen/rejected HH-RLHF pairs (human labels, never trained on by the
   evaluator, never shown to the judge as demonstrations): the evaluator's and the judge's pairwise accuracy,
   the judge asked in both orders with the static demonstration (its parse failures, and how often it picks
   the first position);
2. per setting (``none`` and the ablations ``no_icl``, ``no_d2``, ``no_cycle``), each a fresh fit in its own
   process: the evaluator's gain over the zero-shot white box on the held-out prompts with its paired SE, the
   preferred share before and after, empty share, distinct-2 and looping share after, iterations per prompt
   (all; prompts that agreed; prompts whose samples were identical; prompts that ran out of iterations), the
   judge's requests and failure rate, gain per 100 judge requests, training prompts per hour (training rounds
   only, not the evaluations) and peak RSS (the run's process, and the run with its judge server).

    python benchmarks/real_models.py            # 64 training prompts, 100 evaluation prompts, 4 settings
    python benchmarks/real_models.py --quick    # smoke test: 2 training, 4 evaluation prompts, 'none' only
    python benchmarks/real_models.py --train_prompts 32 --ablations none no_cycle \
        -- --model.cycle.max_iterations 2

    python benchmarks/real_models.py --combine runs/a runs/b   # one table from settings run separately

Settings after ``--`` go to every fit. Each setting writes its run under ``--out`` and a JSON of its figures;
the last lines are a Markdown table for docs/real_models.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
ABLATIONS = ("none", "no_icl", "no_d2", "no_cycle")
PAIRS = "pairs"  # the child that measures the accuracies on human-labelled pairs


# ----------------------------------------------------------------------------------------------- child side


class RssSampler:
    """Peak resident memory of this process and of this process plus its children (the judge server)."""

    def __init__(self, every_s: float = 0.5) -> None:
        import psutil

        self.process = psutil.Process()
        self.peak_total = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(every_s,), daemon=True)
        self._thread.start()

    def _run(self, every_s: float) -> None:
        import psutil

        while not self._stop.wait(every_s):
            total = 0
            for proc in [self.process, *self.process.children(recursive=True)]:
                try:
                    total += proc.memory_info().rss
                except psutil.Error:
                    pass
            self.peak_total = max(self.peak_total, total)

    def stop(self) -> dict[str, float]:
        self._stop.set()
        self._thread.join()
        own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
        return {"peak_rss_gb": own / 2**30, "peak_rss_with_server_gb": max(self.peak_total, own) / 2**30}


def outcome_callback():
    from lightning.pytorch import Callback

    class PromptOutcomes(Callback):
        """Every finished prompt's record, and the time the training rounds took (evaluations excluded)."""

        def __init__(self) -> None:
            self.records: list[Any] = []
            self.started: float | None = None
            self.last: float | None = None

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            if self.started is None:
                self.started = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            outcome = outputs.get("outcome") if isinstance(outputs, dict) else None
            if outcome is not None:
                self.record_outcome(trainer, pl_module, outcome)

        def record_outcome(self, trainer, pl_module, outcome) -> None:
            self.records.extend(outcome.finished)
            self.last = time.perf_counter()

        @property
        def seconds(self) -> float:
            return (self.last or 0.0) - (self.started or 0.0)

    return PromptOutcomes()


def pair_accuracies(module: Any, rows: list[dict[str, str]]) -> dict[str, Any]:
    """The evaluator's and the judge's pairwise accuracy on human-labelled pairs (module docstring)."""
    from cyclealign_pl.evaluators.pairs import overlapping_ids
    from cyclealign_pl.evaluators.train import pairwise_accuracy
    from cyclealign_pl.judges.accuracy import judge_accuracy

    out: dict[str, Any] = {"pairs": len(rows)}
    evaluator = module.reward_model
    trained = getattr(evaluator, "card", {}).get("trained_prompt_keys", [])
    out["evaluator_trained_on"] = len(overlapping_ids(trained, rows))
    prompts = [r["prompt"] for r in rows]
    started = time.perf_counter()
    chosen = evaluator.score(prompts, [r["chosen"] for r in rows])
    rejected = evaluator.score(prompts, [r["rejected"] for r in rows])
    out["evaluator"] = pairwise_accuracy(chosen, rejected)._asdict()
    out["evaluator_seconds"] = time.perf_counter() - started

    judge = module.judge
    judge.preflight()
    started = time.perf_counter()
    counts = judge_accuracy(judge, rows)  # both orders, the static demonstration
    out["judge_seconds"] = time.perf_counter() - started
    n, parsed = counts.judgments, counts.answered
    accuracy = counts.correct / parsed if parsed else math.nan
    out["judge"] = {
        "n": n,
        "parsed": parsed,
        "accuracy": accuracy,
        "standard_error": math.sqrt(accuracy * (1 - accuracy) / parsed) if parsed else math.nan,
        "accuracy_failures_as_wrong": counts.accuracy,
        "parse_failure_rate": counts.failed / n if n else math.nan,
        "first_position_share": counts.first_shown_share,
        "failures": dict(counts.failures),
    }
    return out


def iteration_figures(records: list[Any], max_iterations: int) -> dict[str, Any]:
    """Iterations per prompt over the run, split by how each prompt ended."""

    def mean_iterations(group: list[Any]) -> dict[str, float]:
        its = [len(r.iterations) for r in group]
        return {"prompts": len(group), "iterations": sum(its) / len(its) if its else math.nan}

    agreed = [r for r in records if r.agreed]
    identical = [r for r in records if not r.agreed and r.iterations and r.iterations[-1].degenerate]
    other = [r for r in records if r not in agreed and r not in identical]
    attempts = [it for r in records for it in r.iterations]
    judged = [it for it in attempts if not it.degenerate]
    failures = Counter(str(it.failure).split(":")[0][:60] for it in judged if it.failure is not None)
    return {
        "all": mean_iterations(records),
        "agreed": mean_iterations(agreed),
        "identical_samples": mean_iterations(identical),
        "ran_out_or_failed": mean_iterations(other),
        "max_iterations": max_iterations,
        "judged_iterations": len(judged),
        "judge_failure_rate": sum(it.failure is not None for it in judged) / len(judged)
        if judged
        else math.nan,
        "judge_failures": dict(failures.most_common(5)),
        "used_judge_response": sum(it.used_judge_response for it in attempts),
    }


def child(args: argparse.Namespace) -> None:
    """One fit in this process (or, for ``pairs``, the accuracies only); its figures go to ``args.json``."""
    from cyclealign_pl.cli import main
    from cyclealign_pl.demo.report import compute_figures
    from cyclealign_pl.evaluation import eval_paths

    sampler = RssSampler()
    root = Path(args.out) / args.setting
    cli = main(  # run=False: no subcommand; the fit is started below, with the outcome callback
        [
            "--config",
            args.config,
            "--config",
            str(ROOT / "configs" / "eval" / "human_rm.yaml"),
            "--model.cycle.ablation",
            "none" if args.setting == PAIRS else args.setting,
            "--trainer.default_root_dir",
            str(root),
            "--trainer.enable_progress_bar",
            "false",
            "--trainer.max_epochs",
            "1",
            "--trainer.limit_train_batches",
            "1.0",
            "--trainer.limit_val_batches",
            "1.0",
            "--data.init_args.num_train_prompts",
            str(args.train_prompts),
            "--data.init_args.eval_prompts_per_subset",
            str(args.eval_prompts),
            "--model.judge_check.pairs",  # the pairs step measures the judge; the fits train on it anyway
            "0",
            *args.extra,
        ],
        run=False,
    )
    module, data = cli.model, cli.datamodule
    result: dict[str, Any] = {"setting": args.setting}
    if args.setting == PAIRS:  # its own process and run directory: the fits' judge counts stay their own
        data.setup("fit")
        module.judge.use_run_dir(str(root))
        result["pairs"] = pair_accuracies(module, list(data.eval_rows)[: args.pairs])
        module.judge.close()
        Path(args.json).write_text(json.dumps(result, indent=1, default=str) + "\n", encoding="utf-8")
        return
    outcomes = outcome_callback()
    cli.trainer.callbacks.append(outcomes)
    started = time.perf_counter()
    cli.trainer.fit(module, datamodule=data)
    result["seconds"] = time.perf_counter() - started
    log_dir = Path(cli.trainer.log_dir or root)
    figures = compute_figures(
        eval_paths(log_dir, "zero_shot")["generations"], eval_paths(log_dir, "val")["generations"]
    )
    judge_metrics = module.judge.metrics()
    records = outcomes.records
    result.update(
        figures=figures.as_dict(),
        iterations=iteration_figures(records, module.cycle_config.max_iterations),
        training_prompts=len(records),
        training_seconds=outcomes.seconds,
        prompts_per_hour=3600 * len(records) / outcomes.seconds if outcomes.seconds > 0 else math.nan,
        judge_requests=judge_metrics.get("requests_sent", float(module.counters.iterations)),
        judge_metrics={k: v for k, v in judge_metrics.items() if isinstance(v, (int, float))},
        counters=module.counters.as_dict(),
        # the final evaluation's collapse monitors: a reward model can score loops like any reply
        collapse_warning=(getattr(module, "evaluation_summary", None) or {}).get("collapse_warning"),
        threads=__import__("torch").get_num_threads(),
        run_dir=str(root),
    )
    result.update(sampler.stop())
    Path(args.json).write_text(json.dumps(result, indent=1, default=str) + "\n", encoding="utf-8")
    module.judge.close()


# ---------------------------------------------------------------------------------------------- parent side


def run_setting(args: argparse.Namespace, setting: str) -> dict[str, Any]:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / f"{setting}.json"
    command = [
        sys.executable,
        __file__,
        "--child",
        "--setting",
        setting,
        "--json",
        str(json_path),
        "--config",
        args.config,
        "--out",
        str(out),
        "--train_prompts",
        str(args.train_prompts),
        "--eval_prompts",
        str(args.eval_prompts),
        "--pairs",
        str(args.pairs),
        "--",
        *args.extra,
    ]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    print(f"== {setting}: {' '.join(command[1:])}", flush=True)
    started = time.perf_counter()
    done = subprocess.run(command, env=env, check=False)
    if done.returncode != 0 or not json_path.is_file():
        raise SystemExit(f"{setting}: the fit exited with status {done.returncode} (its log is above)")
    result = json.loads(json_path.read_text(encoding="utf-8"))
    result["process_seconds"] = time.perf_counter() - started
    return result


def _pct(x: float | None) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.0%}"


def report(pairs: dict[str, Any] | None, results: dict[str, dict[str, Any]], args: argparse.Namespace) -> str:
    lines = [f"# real_models: {args.train_prompts} training prompts, {args.eval_prompts} evaluation prompts"]
    if pairs:
        ev, jd = pairs["evaluator"], pairs["judge"]
        lines += [
            f"held-out human-labelled pairs (the evaluation prompts' chosen/rejected): {pairs['pairs']}",
            f"  evaluator accuracy {ev['accuracy']:.3f} +- {ev['standard_error']:.3f} "
            f"(trained on {pairs['evaluator_trained_on']} of them)",
            f"  judge accuracy {jd['accuracy']:.3f} +- {jd['standard_error']:.3f} over {jd['parsed']} "
            f"parsed of {jd['n']} (both orders; failures counted wrong: "
            f"{jd['accuracy_failures_as_wrong']:.3f}), "
            f"parse failures {_pct(jd['parse_failure_rate'])}, first position picked "
            f"{_pct(jd['first_position_share'])}, {pairs['judge_seconds']:.0f} s",
        ]
    header = (
        "| setting | gain +- SE (z) | preferred before -> after | empty / distinct-2 / looping after "
        "| iterations/prompt (agreed; identical; ran out) | judge requests | judge failures "
        "| gain per 100 requests "
        "| prompts/hour | peak RSS (with server) |"
    )
    lines += ["", header, "|" + " --- |" * (header.count("|") - 1)]
    for setting, r in results.items():
        f, it = r["figures"], r["iterations"]
        z = f["gain_in_se"]
        groups = "; ".join(
            f"{it[k]['iterations']:.2f} x{it[k]['prompts']}" if it[k]["prompts"] else "- x0"
            for k in ("agreed", "identical_samples", "ran_out_or_failed")
        )
        collapsed = " **collapsed**" if r.get("collapse_warning") else ""
        lines.append(
            f"| {setting} | {f['reward_gain']:+.2f} +- {f['reward_gain_se']:.2f} ({z:.1f}){collapsed} | "
            f"{_pct(f['zero_shot']['preferred_share'])} -> {_pct(f['trained']['preferred_share'])} | "
            f"{_pct(f['trained']['empty_share'])} / {f['trained']['distinct_2']:.3f} / "
            f"{_pct(f['trained'].get('looping_share'))} | "
            f"{it['all']['iterations']:.2f} ({groups}) | {r['judge_requests']:.0f} | "
            f"{_pct(it['judge_failure_rate'])} | "
            f"{100 * f['reward_gain'] / max(r['judge_requests'], 1):+.2f} | {r['prompts_per_hour']:.0f} | "
            f"{r['peak_rss_gb']:.2f} GB ({r['peak_rss_with_server_gb']:.2f} GB) |"
        )
    lines.append(
        "\n(zero-shot empty / distinct-2 / looping: "
        + ", ".join(
            f"{s}: {_pct(r['figures']['zero_shot']['empty_share'])} / "
            f"{r['figures']['zero_shot']['distinct_2']:.3f} / "
            f"{_pct(r['figures']['zero_shot'].get('looping_share'))}"
            for s, r in results.items()
        )
        + f"; torch threads {next(iter(results.values()))['threads'] if results else '?'})"
    )
    lines += [
        f"\n{setting}: the replies collapsed: {r['collapse_warning']}; its gain is how the evaluator scores "
        "collapsed replies, not alignment"
        for setting, r in results.items()
        if r.get("collapse_warning")
    ]
    return "\n".join(lines)


def combine(out_dirs: list[str]) -> tuple[dict[str, Any] | None, dict[str, dict[str, Any]], tuple[int, int]]:
    """The pairs and the settings' figures that earlier runs wrote under ``out_dirs``, for one table: the
    full setting takes hours on 2 cores, so its settings may run apart (the sizes must match)."""
    pairs, results, sizes = None, {}, set()
    for out in map(Path, out_dirs):
        if not out.is_dir():
            raise SystemExit(f"--combine: {out} is not a directory")
        for setting in (PAIRS, *ABLATIONS):
            path = out / f"{setting}.json"
            if not path.is_file():
                continue
            try:
                result = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError) as err:
                raise SystemExit(f"--combine: {path} is not a figures file: {err}") from None
            if setting == PAIRS:
                if pairs is not None:
                    raise SystemExit(f"--combine: two pairs files ({path} and one before it)")
                pairs = result["pairs"]
                continue
            if setting in results:
                raise SystemExit(
                    f"--combine: {setting} appears twice ({path} and {results[setting]['run_dir']})"
                )
            results[setting] = result
            sizes.add((result["training_prompts"], result["figures"]["trained"]["prompts"]))
    if not results:
        raise SystemExit(f"--combine: no setting's figures (<setting>.json) under {' '.join(out_dirs)}")
    if len(sizes) > 1:
        raise SystemExit(
            "--combine: the settings ran at different sizes (training, evaluation prompts): "
            + ", ".join(f"{t}/{e}" for t, e in sorted(sizes))
        )
    results = {s: results[s] for s in ABLATIONS if s in results}
    return pairs, results, sizes.pop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "smollm2.yaml"))
    parser.add_argument("--train_prompts", type=int, default=64)
    parser.add_argument("--eval_prompts", type=int, default=100)
    parser.add_argument("--ablations", nargs="+", default=list(ABLATIONS), choices=ABLATIONS)
    parser.add_argument("--quick", action="store_true", help="2 training, 4 evaluation prompts, 'none' only")
    parser.add_argument("--out", default=str(ROOT / "runs" / "real_models"))
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--setting", default="none", help=argparse.SUPPRESS)
    parser.add_argument("--json", help=argparse.SUPPRESS)
    parser.add_argument(
        "--pairs",
        type=int,
        default=None,
        help="held-out pairs for the accuracies (default: every eval prompt's)",
    )
    parser.add_argument(
        "--combine",
        nargs="+",
        metavar="OUT",
        help="print one table from the figures of earlier --out folders",
    )
    parser.add_argument("extra", nargs="*", help="more CLI arguments for every fit (after --)")
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    if args.combine:
        pairs, results, (args.train_prompts, args.eval_prompts) = combine(args.combine)
        print(report(pairs, results, args))
        return
    if args.quick:
        args.train_prompts, args.eval_prompts, args.pairs, args.ablations = 2, 4, 4, ["none"]
    if args.pairs is None:
        args.pairs = args.eval_prompts
    if Path(args.out).exists() and any(Path(args.out).iterdir()):
        raise SystemExit(f"{args.out} is not empty: choose another --out (each setting is a fresh run)")
    results: dict[str, dict[str, Any]] = {}
    pairs = run_setting(args, PAIRS)["pairs"] if args.pairs else None
    print(report(pairs, results, args), flush=True)
    for setting in args.ablations:
        results[setting] = run_setting(args, setting)
        print(report(pairs, results, args), flush=True)
    text = report(pairs, results, args)
    (Path(args.out) / "report.md").write_text(text + "\n", encoding="utf-8")
    print(f"\nwritten: {Path(args.out) / 'report.md'}")


if __name__ == "__main__":
    main()
