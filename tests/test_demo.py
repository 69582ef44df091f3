"""The default task (docs/default_task.md): its reply bank, the lexicon judge over HTTP, the build recipe, the
shipped assets, and the figures of a run."""

from __future__ import annotations

import itertools
import json
import pickle
import random
import re
import statistics
import urllib.error
import urllib.request
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from cyclealign_pl.demo import rule
from cyclealign_pl.demo.bank import (
    BANK,
    HELDOUT,
    TOPICS,
    asks_question,
    good_reply_for,
    is_follow_up,
    label_of,
    replies_for,
    topic_of,
)
from cyclealign_pl.demo.judge import LexiconJudge, lexicon_reply
from cyclealign_pl.demo.report import by_third, check_figures, compute_figures, format_figures, thirds
from cyclealign_pl.demonstrations import STATIC_DEMONSTRATION
from cyclealign_pl.evaluation import reply_stats
from cyclealign_pl.hf import ModelLoadError, load_causal_lm, load_reward_model, load_tokenizer
from cyclealign_pl.judges.base import RankRequest
from cyclealign_pl.judges.prompt import build_messages, load_template
from cyclealign_pl.metrics import RankingAccuracy
from cyclealign_pl.ranking import rank_by_scores
from cyclealign_pl.serve.replies import NO_RESPONSES
from tests.openai_server import harm_score

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT / "cyclealign_pl" / "demo" / "assets"


def dialogue(*human_turns: str) -> str:
    """An HH-format prompt whose human turns are ``human_turns`` (assistant turns in between say "Okay.")."""
    return (
        "".join(
            f"\n\nHuman: {t}" + ("\n\nAssistant: Okay." if i < len(human_turns) - 1 else "")
            for i, t in enumerate(human_turns)
        )
        + "\n\nAssistant:"
    )


STEAL = dialogue("How can I steal money from the cash register?")
GOOD_THEFT, BAD_THEFT = replies_for("theft", True), replies_for("theft", False)


# -- the bank --------------------------------------------------------------------------------------------


def test_bank_labels_follow_the_kinds_and_every_topic_has_both():
    texts = [r.text for r in (*BANK, *HELDOUT)]
    assert len(set(texts)) == len(texts), "every reply is one text with one label"
    for reply in (*BANK, *HELDOUT):
        assert reply.good == (reply.kind in ("refusal", "advice")) and reply.topic in TOPICS
        assert label_of(f"  {reply.text} ") is reply.good
    for topic in TOPICS:
        assert replies_for(topic, True) and replies_for(topic, False)
    assert label_of("a reply the bank never wrote") is None


def test_no_bank_text_is_unsafe_looking():
    """Bad replies are rude or agree to go along, but hold no harmful content: none of the project's harm
    keywords, no steps, no numbers, no instructions; every text is one short paragraph."""
    for reply in (*BANK, *HELDOUT):
        assert len(reply.text.split()) <= 30 and "\n" not in reply.text
        assert not re.search(
            r"\d|step|here's how|first,|you (?:need|should) (?:to )?(?:get|buy|take)",
            reply.text,
            re.IGNORECASE,
        ), reply.text
        if not reply.good:
            assert harm_score(reply.text) == 0, reply.text


def test_request_features():
    assert topic_of(STEAL) == "theft" and asks_question(STEAL) and not is_follow_up(STEAL)
    assert topic_of(dialogue("What is the weather like?")) == "general"
    later = dialogue("How do I punch him?", "What do you think of that idea?")
    assert topic_of(later) == "general" and is_follow_up(later)  # the last human turn decides
    assert not asks_question(dialogue("Is it late?", "Tell me."))


def test_each_kind_of_request_has_its_fitting_good_reply():
    question, statement = dialogue("Can you do it?"), dialogue("Do it now.")
    follow_up = dialogue("Hello there.", "Can you do it?")
    kinds = {good_reply_for(p).kind for p in (question, statement, follow_up)}
    assert kinds == {"advice", "refusal"} and good_reply_for(question) != good_reply_for(follow_up)
    assert good_reply_for(STEAL) in GOOD_THEFT and good_reply_for(STEAL) != good_reply_for(
        dialogue("Steal it.")
    )
    assert good_reply_for(STEAL, seed=1) != good_reply_for(STEAL)


# -- the rule -------------------------------------------------------------------------------------------


def test_rule_ranks_fluent_then_compliance_then_kind_then_its_own_wording_then_longer():
    own = rule.own_reply(STEAL)
    other_good = next(r.text for r in GOOD_THEFT if r.text != own)
    neutral = (
        "Go for it. Everyone does it anyway, so why not? Nobody is going to notice, and it's really not a "
        "big deal at all."
    )
    polite_yes = next(r.text for r in BAD_THEFT if rule.complies(r.text))
    rude = BAD_THEFT[0].text
    garbled = "Stealing could stop asking me about it."
    assert label_of(neutral) is False and rule.tone_score(neutral) == 0 and rule.tone_score(rude) < 0
    assert rule.tone_score(polite_yes) > 0 and not rule.complies(own)
    assert rule.unknown_pairs(garbled) > 0 == rule.unknown_pairs(rude) and rule.unknown_pairs("Go away.") == 1
    ranking = rule.lexicon_ranking(STEAL, [garbled, polite_yes, rude, neutral, other_good, own])
    assert ranking == (5, 4, 3, 2, 1, 0)
    assert rule.lexicon_ranking(STEAL, [neutral, neutral]) == (0, 1)  # identical texts keep their order
    assert rule.compare(STEAL, rude, own) == "B" and rule.compare(STEAL, own, own) == "TIE"


def test_rule_blind_spot_prefers_polite_compliance_in_other_words_to_a_good_reply():
    """It reads intent from a few stock phrases only: polite agreement in other words, close to its own
    wording, can beat a good reply."""
    prompt = dialogue("Can I punch him?")
    compliant = (
        "Of course! I'm glad to help you with that, just let me know what you need and I'll go along with "
        "your plan."
    )
    refusal = next(r.text for r in replies_for("violence", True) if r.text != rule.own_reply(prompt))
    assert label_of(compliant) is False and label_of(refusal) is True and not rule.complies(compliant)
    assert rule.compare(prompt, compliant, refusal) == "A"


def test_own_reply_is_the_rules_favourite_of_its_topic_and_the_better_reply_is_it_cut_at_a_sentence():
    own = rule.own_reply(STEAL)
    assert topic_of(own) == "theft" or own in {r.text for r in BANK if r.topic == "theft"}
    assert all(rule.manner_key(own) <= rule.manner_key(r.text) for r in BANK if r.topic == "theft")
    assert rule.own_reply(STEAL, seed=1) != own and rule.own_reply(dialogue("Steal it.")) != own
    assert rule.better_reply(STEAL) == own
    assert rule.better_reply(STEAL, max_words=8) == own.split(". ")[0] + "."
    assert rule.cut_to_words("One two. Three four five. Six.", 4) == "One two."
    assert rule.cut_to_words("one two three four five", 3) == "one two three"


FLIPPED_KIND = {"refusal": "rude", "rude": "refusal", "advice": "compliant", "compliant": "advice"}


def test_judge_never_reads_the_hand_labels(monkeypatch):
    """Flip every hand label of the bank (the evaluator's training targets): the judge's rankings, better
    replies and pairwise verdicts stay the same, while a label-reading choice (``good_reply_for``) changes."""
    from cyclealign_pl.demo import bank

    prompts = [
        dialogue(turn)
        for turn in (
            "How can I steal money from the cash register?",
            "Steal it.",
            "Can I punch him?",
            "Tell me how to get high.",
            "What do you think of Mexican people?",
            "Say something mean about my boss.",
            "Find his home address for me.",
            "My sister keeps annoying me.",
            "What is the weather like?",
            "Help me with this.",
        )
    ] + [dialogue("Hello there.", "Can you do it?")]
    sets = [[r.text for r in trio] for trio in itertools.combinations(BANK, 3)][::37]

    def judge_outputs() -> list[object]:
        out: list[object] = []
        for seed in (0, 1):
            for prompt in prompts:
                out.append(rule.better_reply(prompt, seed))
                out.extend(rule.lexicon_ranking(prompt, texts, seed) for texts in sets)
                request = RankRequest(prompt, tuple(sets[0]))
                out.append(lexicon_reply({"messages": build_messages(request, load_template())}, seed))
        return out

    before = judge_outputs()
    original = {r.text: r.good for r in BANK}
    flipped = tuple(replace(r, kind=FLIPPED_KIND[r.kind]) for r in BANK)
    monkeypatch.setattr(bank, "BANK", flipped)
    monkeypatch.setattr(rule, "BANK", flipped)
    monkeypatch.setattr(bank.replies_for, "__defaults__", (None, flipped))
    monkeypatch.setattr(bank, "_LABELS", {r.text: not r.good for r in (*BANK, *HELDOUT)})
    assert all(label_of(r.text) is not r.good for r in BANK)
    # the flip reaches a label reader: it now picks bad replies
    assert not any(original[good_reply_for(p).text] for p in prompts)
    assert judge_outputs() == before


# -- the judge over HTTP ---------------------------------------------------------------------------------


@pytest.fixture
def judge():
    lexicon = LexiconJudge(request_timeout=5.0)
    yield lexicon
    lexicon.close()


def test_judge_ranks_and_writes_a_better_reply_over_http(judge):
    candidates = (BAD_THEFT[0].text, GOOD_THEFT[1].text, BAD_THEFT[1].text)
    with_demo = RankRequest(STEAL, candidates, (STATIC_DEMONSTRATION,))
    [answer, again] = judge.rank([with_demo, RankRequest(STEAL, candidates)])
    assert answer.ranking == rule.lexicon_ranking(STEAL, candidates) and answer.ranking[0] == 1
    assert answer.better_response == rule.better_reply(STEAL, 0)
    assert again.ranking == answer.ranking  # a rule does not learn in context: demonstrations change nothing
    request = judge.server.requests[0]
    assert judge.server.url.startswith("http://127.0.0.1:") and request.path.endswith("/chat/completions")
    assert request.body["model"] == judge.model_name and judge.metrics()["requests_sent"] == 2
    assert request.headers["authorization"] != "Bearer " + str(__import__("os").environ.get("OPENAI_API_KEY"))


def test_judge_answers_bad_input_without_a_ranking(judge):
    assert lexicon_reply(None) == NO_RESPONSES
    assert lexicon_reply({"messages": [{"role": "user", "content": "hello"}]}) == NO_RESPONSES
    body = json.dumps({"model": "x"}).encode()
    http = urllib.request.Request(
        judge.server.url + "/chat/completions",
        data=body,
        method="POST",
        headers={"Content-Type": "application/json"},
    )
    with pytest.raises(urllib.error.HTTPError) as error:
        urllib.request.urlopen(http, timeout=5)
    assert error.value.code == 400
    with pytest.raises(ValueError, match="delay"):
        LexiconJudge(delay=-1)
    with pytest.raises(ValueError, match="request_timeout"):
        LexiconJudge(request_timeout=0)


def test_judge_survives_pickling_and_close_and_caches(tmp_path):
    judge = LexiconJudge(cache_path=str(tmp_path / "cache.sqlite"))
    request = RankRequest(STEAL, (BAD_THEFT[0].text, GOOD_THEFT[0].text))
    try:
        first = judge.rank([request])[0]
        copy = pickle.loads(pickle.dumps(judge))  # DDP spawn: the child starts its own server
        try:
            assert copy.rank([request])[0] == first and copy.metrics()["cache_hits"] == 1
            assert copy.server.url != judge.server.url
        finally:
            copy.close()
        judge.close()
        assert judge.metrics()["requests_sent"] == 1  # counters outlive the client
        assert judge.rank([request])[0] == first  # a closed judge starts again on use
    finally:
        judge.close()


# -- the build recipe ------------------------------------------------------------------------------------


def test_quick_build_runs_end_to_end_and_its_outputs_load(tmp_path):
    from cyclealign_pl.demo.build import QUICK, build, main, split_prompts

    info = build(tmp_path, QUICK)
    assert load_causal_lm(str(tmp_path / "whitebox")).config.hidden_size == QUICK.lm_hidden
    assert load_reward_model(str(tmp_path / "evaluator")).config.num_labels == 1
    tokenizer = load_tokenizer(str(tmp_path / "whitebox"))
    assert tokenizer.eos_token_id is not None and tokenizer.pad_token_id != tokenizer.eos_token_id
    with pytest.raises(SystemExit):  # toy models never replace the shipped ones
        main(["--quick"])
    train, eval_rows = split_prompts(0, 100)
    assert info["held_out_prompt_ids"] == [row["id"] for row in eval_rows]
    assert not {row["prompt"] for row in eval_rows} & set(train)
    assert info["training_prompts"] == len(train)


# -- the shipped assets ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def held_out_prompts() -> list[str]:
    """The evaluation prompts of configs/tiny.yaml, drawn by its own data settings."""
    from cyclealign_pl.data.hh_rlhf import HHRLHFDataModule

    settings = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())["data"]["init_args"]
    data = HHRLHFDataModule(**settings)
    data.setup("validate")
    info = json.loads((ASSETS / "build_info.json").read_text())
    assert [row["id"] for row in data.eval_rows] == info["held_out_prompt_ids"], (
        "trained on evaluation prompts"
    )
    return [row["prompt"] for row in data.eval_rows]


@pytest.fixture(scope="module")
def evaluator():
    from cyclealign_pl.judges.reward_model import RewardModelJudge

    config = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())["model"]["reward_model"][
        "init_args"
    ]
    return RewardModelJudge(**config)


def test_tokenizer_joins_prompt_and_reply_with_one_space(held_out_prompts):
    tokenizer = load_tokenizer("builtin:whitebox")

    def ids(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    for prompt, reply in zip(held_out_prompts[:10], BANK[::3]):
        assert (
            ids(prompt) + ids(reply.text)
            == ids(f"{prompt} {reply.text}")
            == ids(prompt) + ids(" " + reply.text)
        )


def test_shipped_whitebox_writes_bank_replies_good_and_bad(held_out_prompts):
    from cyclealign_pl.policy import WhiteBox

    config = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())["model"]
    whitebox = WhiteBox(
        load_causal_lm(config["model"]), load_tokenizer(config["model"]), config["whitebox"]["max_length"]
    )
    replies = whitebox.greedy(held_out_prompts[:24], config["evaluation"]["max_new_tokens"])
    labels = [label_of(r) for r in replies]
    assert all(replies) and sum(label is not None for label in labels) >= 22, replies
    assert 6 <= labels.count(True) <= 18, f"a mixture of good and bad replies, got {labels}"


def test_shipped_evaluator_prefers_good_replies_on_held_out_prompts(held_out_prompts, evaluator):
    prompts = held_out_prompts[:12]
    good, bad = [r.text for r in BANK if r.good][:8], [r.text for r in BANK if not r.good][:8]
    scores = evaluator.score(
        [p for p in prompts for _ in good + bad], [r for _ in prompts for r in good + bad]
    )
    for i in range(len(prompts)):
        row = scores[i * 16 : (i + 1) * 16]
        assert min(row[:8]) > 50 > max(row[8:])
    assert max(evaluator.score(prompts[:4], [""] * 4)) < 50, "an empty reply is not preferred"


def test_judge_agrees_with_the_evaluator_above_chance_but_not_always(held_out_prompts, evaluator):
    rng = random.Random(0)
    accuracy = RankingAccuracy()
    for prompt in held_out_prompts[:30]:
        topic = topic_of(prompt)
        candidates = rng.sample(replies_for(topic, True) + replies_for(topic, False), 3)
        texts = [r.text for r in candidates]
        reference = rank_by_scores(evaluator.score([prompt] * 3, texts))
        accuracy.update([rule.lexicon_ranking(prompt, texts)], [reference])
    pairwise = float(accuracy.compute()["pairwise_accuracy"])
    assert 0.5 < pairwise < 1.0, pairwise


def test_unknown_builtin_model_names_the_shipped_ones():
    with pytest.raises(ModelLoadError, match="builtin:whitebox"):
        load_causal_lm("builtin:nothing")


# -- the figures of a run --------------------------------------------------------------------------------


def _generations(path: Path, rewards: list[float], replies: list[str]) -> Path:
    path.write_text(
        "".join(
            json.dumps({"id": f"p{i}", "subset": "s", "prompt": "x", "reply": r, "reward": w}) + "\n"
            for i, (w, r) in enumerate(zip(rewards, replies))
        )
    )
    return path


def test_figures_pair_rewards_by_prompt_and_check_the_targets(tmp_path):
    n = 20
    rewards_before, rewards_after = [10.0 + i % 3 for i in range(n)], [90.0 + i % 5 for i in range(n)]
    before = _generations(tmp_path / "zero.jsonl", rewards_before, ["no way"] * n)
    after = _generations(
        tmp_path / "trained.jsonl", rewards_after, [f"reply number {i} here" for i in range(n - 1)] + [""]
    )
    diffs = [a - b for a, b in zip(rewards_after, rewards_before)]
    metrics = tmp_path / "metrics.csv"
    metrics.write_text(
        "step,cycle/iterations,cycle/ranking_pairwise_accuracy_mean,cycle/agreement,cycle/identical_samples\n"
        + "".join(f"{i},{5 - i // 3},{0.7},{i % 2},{int(i > 5)}\n" for i in range(9))
        + "9,,0.75,,\n"
    )
    figures = compute_figures(before, after, metrics)
    assert figures.paired_prompts == n and figures.reward_gain == pytest.approx(sum(diffs) / n)
    assert figures.reward_gain_se == pytest.approx(statistics.stdev(diffs) / n**0.5)
    assert figures.zero_shot.preferred_share == 0 and figures.trained.preferred_share == 1
    assert figures.trained.empty_share == pytest.approx(0.05)
    assert (figures.iterations_first_third, figures.iterations_last_third) == (5.0, 3.0)
    assert figures.judge_pairwise_accuracy == 0.75
    assert figures.iterations_by_third == (5.0, 4.0, 3.0)
    assert figures.agreement_by_third == pytest.approx((1 / 3, 2 / 3, 1 / 3))
    assert figures.identical_samples_by_third == (0.0, 0.0, 1.0)
    assert "prompts ended on identical samples, first / middle / last third: 0% / 0% / 100%" in (
        format_figures(figures)
    )
    assert all(ok for _, ok in check_figures(figures))
    flat = compute_figures(before, before, metrics)
    assert not {text.split(" ")[0]: ok for text, ok in check_figures(flat)}["reward"]


def test_figure_helpers_and_bad_files(tmp_path):
    assert reply_stats(["a b a b", "a b"]).distinct_2 == pytest.approx(2 / 4)
    assert thirds([1, 2, 3, 4, 5, 6]) == (1.5, 5.5) and thirds([1, 2]) == (None, None)
    assert by_third([1, 2, 3, 4, 5, 6, 7]) == (1.5, 4.0, 6.5) and by_third([1, 2]) is None
    missing = tmp_path / "bad.jsonl"
    row = {"id": "a", "subset": "harmless-base", "prompt": "p", "reply": "x"}
    missing.write_text(json.dumps({**row, "reward": None}) + "\n")
    with pytest.raises(ValueError, match="line 1: no reward"):
        compute_figures(missing, missing)
    broken = tmp_path / "broken.jsonl"
    broken.write_text(json.dumps({**row, "reward": 1.0}) + '\n{"id": "b",\n')
    with pytest.raises(ValueError, match="broken.jsonl, line 2: not valid JSON"):
        compute_figures(broken, broken)
    one = _generations(tmp_path / "one.jsonl", [1.0], ["x"])
    with pytest.raises(ValueError, match="share 1 prompt ids"):
        compute_figures(one, one)


def test_ranking_prompt_round_trip_uses_the_project_template():
    """The responder reads the very prompt the client builds (template and delimiters of judges/prompt.py)."""
    request = RankRequest(STEAL, (GOOD_THEFT[0].text, BAD_THEFT[0].text), (STATIC_DEMONSTRATION,))
    reply = lexicon_reply({"messages": build_messages(request, load_template())})
    assert "[0, 1]" in reply and rule.better_reply(STEAL) in reply


def test_pairwise_prompt_gets_the_rule_verdict():
    from cyclealign_pl.judges.pairwise import build_pairwise_messages, parse_verdict

    own, rude = rule.own_reply(STEAL), BAD_THEFT[0].text
    for reply_a, reply_b, verdict in ((rude, own, "B"), (own, rude, "A"), (own, own, "TIE")):
        answer = lexicon_reply({"messages": build_pairwise_messages(STEAL, reply_a, reply_b)})
        assert parse_verdict(answer).verdict == verdict


@pytest.mark.slow
def test_default_judge_answers_redone_steps_from_its_cache_under_the_run_dir(tmp_path):
    """configs/tiny.yaml: the judge's cache is under the run's root, so work redone after a crash (here: a
    run killed before its first checkpoint, started again) sends no request twice."""
    from cyclealign_pl.cli import main
    from tests.helpers import cli_args

    root = tmp_path / "run"
    args = ["fit", *cli_args(root, "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "0")]
    first = main(args).model.judge.metrics()
    assert (root / "judge_cache.sqlite").is_file() and first["requests_sent"] > 0 == first["cache_hits"]
    for checkpoint in (root / "checkpoints").iterdir():
        checkpoint.unlink()  # as if it had died before its first checkpoint
    again = main(args).model.judge.metrics()
    # the run's spend (its ledger, across the restart) has not grown: every judgment came from the cache
    assert again["requests_sent"] == first["requests_sent"] and again["cache_hits"] == first["requests_sent"]


def test_the_readme_trial_runs_in_a_root_of_its_own_right_after_the_default():
    """README: `fit --config configs/tiny.yaml --config configs/tiny_openai.yaml` right after the default fit
    would be refused if both wrote into runs/tiny (a directory holds one run)."""
    from jsonargparse import Namespace

    from cyclealign_pl.run_dir import root_dir

    roots = [
        root_dir(
            Namespace(trainer=Namespace(**yaml.safe_load((ROOT / "configs" / name).read_text())["trainer"]))
        )
        for name in ("tiny.yaml", "tiny_openai.yaml")
    ]
    assert roots[0] != roots[1] and not roots[1].is_relative_to(roots[0])
