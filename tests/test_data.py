"""Data loading: HH-RLHF cleaning and sampling, the shipped sample, BeaverTails, and bad input."""

from __future__ import annotations

import gzip
import json
import logging
from collections import Counter
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from lightning.pytorch import LightningModule, Trainer

from cyclealign_pl.data import (
    BATCH_KEYS,
    DROP_REASONS,
    SAMPLE_ROOT,
    BeaverTailsDataModule,
    DataFileError,
    HHRLHFDataModule,
    Turn,
    clean_pair,
    load_beavertails,
    load_hh_rlhf,
    parse_dialogue,
    render_prompt,
)

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
HH_ROOT = SHARED / "hh-rlhf"
BEAVERTAILS_CSV = SHARED / "beavertails" / "BeaverTails-Evaluation.csv"
needs_shared = pytest.mark.skipif(not HH_ROOT.is_dir(), reason="../shared/data is not available")


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(tmp_path_factory.mktemp("hf-datasets-cache"))


def dialogue(*turns: tuple[str, str]) -> str:
    return "".join(f"\n\n{speaker}: {text}" for speaker, text in turns)


def pair(prompt: str, chosen: str = "Sure.", rejected: str = "No.") -> dict[str, str]:
    return {
        "chosen": dialogue(("Human", prompt), ("Assistant", chosen)),
        "rejected": dialogue(("Human", prompt), ("Assistant", rejected)),
    }


def write_split(root: Path, subset: str, split: str, records: list[dict | str], *, gz: bool = True) -> Path:
    """Write JSON lines (dicts are dumped, strings written as they are) in the upstream layout."""
    path = root / subset / (f"{split}.jsonl.gz" if gz else f"{split}.jsonl")
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records)
    path.write_bytes(gzip.compress(text.encode()) if gz else text.encode())
    return path


# ------------------------------------------------------------------------------------ the real file


@pytest.fixture(scope="module")
def real_module(cache_dir: str) -> HHRLHFDataModule:
    if not HH_ROOT.is_dir():
        pytest.skip("../shared/data is not available")
    dm = HHRLHFDataModule(
        root=str(HH_ROOT),
        train_split="test",
        eval_split="test",
        num_train_prompts=None,
        eval_prompts_per_subset=100,
        cache_dir=cache_dir,
    )
    dm.setup("fit")
    return dm


def test_real_harmless_base_all_rows_accounted_for(real_module: HHRLHFDataModule) -> None:
    stats = real_module.cleaning_stats["harmless-base/test"]
    print("harmless-base/test cleaning:", stats.as_dict())
    assert stats.rows == 2312
    assert stats.kept + stats.num_dropped == 2312
    expected = {"empty_chosen": 4, "reply_starts_with_speaker_tag": 29, "duplicate_prompt": 2}
    assert dict(stats.dropped) == expected
    assert set(stats.dropped) <= set(DROP_REASONS)
    assert stats.merged_turns == 13  # 8 runs of consecutive assistant turns in chosen, 5 in rejected
    assert stats.kept == 2277
    # with every row used, train + eval is exactly the kept rows, with no overlap
    train, evaluation = real_module.train_rows, real_module.eval_rows
    assert len(evaluation) == 100 and len(train) == 2277 - 100
    assert len({r["id"] for r in train + evaluation}) == 2277


def test_real_harmless_base_rows_are_well_formed(real_module: HHRLHFDataModule) -> None:
    rows = real_module.train_rows + real_module.eval_rows
    for row in rows:
        prompt = row["prompt"]
        assert prompt.startswith("\n\nHuman: ") and prompt.endswith("\n\nAssistant:")
        turns = parse_dialogue(prompt + " x").turns
        assert [t.speaker for t in turns] == ["Human", "Assistant"] * (len(turns) // 2)  # alternating
        assert row["chosen"] and row["chosen"] == row["chosen"].strip()
        assert row["rejected"] and row["rejected"] == row["rejected"].strip()
        assert row["subset"] == "harmless-base" and row["id"].startswith("harmless-base:test:")
    assert len({r["prompt"] for r in rows}) == len(rows)
    first = min(rows, key=lambda r: int(r["id"].rsplit(":", 1)[1]))
    assert first["id"] == "harmless-base:test:1"  # line numbers start at 1


# ------------------------------------------------------------------------------------ cleaning


def test_parse_dialogue_merges_same_speaker_turns_and_keeps_paragraphs() -> None:
    text = dialogue(
        ("Human", "hi"),
        ("Assistant", "one\n\ntwo"),
        ("Assistant", "three"),
        ("Human", "ok"),
        ("Human", "and?"),
        ("Assistant", "done"),
    )
    parsed = parse_dialogue(text)
    assert parsed.turns == (
        Turn("Human", "hi"),
        Turn("Assistant", "one\n\ntwo\nthree"),
        Turn("Human", "ok\nand?"),
        Turn("Assistant", "done"),
    )
    assert parsed.merged_turns == 2 and parsed.preamble == ""


def test_parse_dialogue_accepts_missing_leading_blank_line_and_reports_preamble() -> None:
    expected = (Turn("Human", "hi"), Turn("Assistant", "yo"))
    assert parse_dialogue("Human: hi\n\nAssistant: yo").turns == expected
    assert parse_dialogue("note\n\nHuman: hi").preamble == "note"


def test_clean_pair_keeps_context_and_final_replies() -> None:
    context = [("Human", "a?"), ("Assistant", "b."), ("Human", "c?")]
    result = clean_pair(dialogue(*context, ("Assistant", " good ")), dialogue(*context, ("Assistant", "bad")))
    assert result.reason is None and result.pair is not None
    assert result.pair.prompt == "\n\nHuman: a?\n\nAssistant: b.\n\nHuman: c?\n\nAssistant:"
    assert (result.pair.chosen, result.pair.rejected) == ("good", "bad")


@pytest.mark.parametrize(
    ("chosen", "rejected", "reason"),
    [
        (dialogue(("Human", "q")), dialogue(("Human", "q")), "no_assistant_turn"),
        ("no tags at all", "no tags at all", "no_assistant_turn"),
        (
            "intro" + dialogue(("Human", "q"), ("Assistant", "a")),
            dialogue(("Human", "q"), ("Assistant", "b")),
            "text_before_first_turn",
        ),
        (
            dialogue(("Assistant", "hello"), ("Human", "q"), ("Assistant", "a")),
            dialogue(("Assistant", "hello"), ("Human", "q"), ("Assistant", "b")),
            "first_turn_not_human",
        ),
        (
            dialogue(("Human", "q"), ("Assistant", "a"), ("Human", "more")),
            dialogue(("Human", "q"), ("Assistant", "b")),
            "final_turn_not_assistant",
        ),
        (
            dialogue(("Human", "q1"), ("Assistant", "a")),
            dialogue(("Human", "q2"), ("Assistant", "b")),
            "context_mismatch",
        ),
        (
            dialogue(("Human", ""), ("Assistant", "a")),
            dialogue(("Human", ""), ("Assistant", "b")),
            "empty_prompt",
        ),
        (
            dialogue(("Human", "q"), ("Assistant", " ")),
            dialogue(("Human", "q"), ("Assistant", "b")),
            "empty_chosen",
        ),
        (
            dialogue(("Human", "q"), ("Assistant", "a")),
            dialogue(("Human", "q"), ("Assistant", "")),
            "empty_rejected",
        ),
        (
            dialogue(("Human", "q"), ("Assistant", "Human: again")),
            dialogue(("Human", "q"), ("Assistant", "b")),
            "reply_starts_with_speaker_tag",
        ),
    ],
)
def test_clean_pair_drop_reasons(chosen: str, rejected: str, reason: str) -> None:
    result = clean_pair(chosen, rejected)
    assert result.pair is None and result.reason == reason and reason in DROP_REASONS


_text = st.text(alphabet="ab .?\n", min_size=1, max_size=12).map(str.strip).filter(bool)


@settings(max_examples=60, deadline=None)
@given(context=st.lists(_text, min_size=1, max_size=4), chosen=_text, rejected=_text)
def test_clean_pair_inverts_rendering(context: list[str], chosen: str, rejected: str) -> None:
    turns = [Turn("Human" if i % 2 == 0 else "Assistant", text) for i, text in enumerate(context)]
    if turns[-1].speaker == "Assistant":
        turns.append(Turn("Human", "next?"))
    prompt = render_prompt(turns)
    result = clean_pair(f"{prompt} {chosen}", f"{prompt} {rejected}")
    assert result.pair is not None, result.reason
    assert result.pair == (prompt, chosen, rejected) and result.merged_turns == 0


# ---------------------------------------------------------------------------------- malformed files


def test_missing_root_directory_fails_at_init(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="root directory not found"):
        HHRLHFDataModule(root=str(tmp_path / "nowhere"))


def test_missing_file_is_named(tmp_path: Path, cache_dir: str) -> None:
    dm = HHRLHFDataModule(root=str(tmp_path), cache_dir=cache_dir)
    with pytest.raises(FileNotFoundError, match=r"harmless-base/test\.jsonl\.gz"):
        dm.setup("validate")


def test_empty_file_is_an_error(tmp_path: Path, cache_dir: str) -> None:
    path = write_split(tmp_path, "harmless-base", "test", [])
    with pytest.raises(DataFileError, match="empty") as err:
        load_hh_rlhf(tmp_path, "harmless-base", "test", cache_dir)
    assert err.value.path == str(path)


def test_bad_gzip_names_file_and_line(tmp_path: Path, cache_dir: str) -> None:
    path = tmp_path / "harmless-base" / "test.jsonl.gz"
    path.parent.mkdir()
    path.write_bytes(b"this is not gzip data\n")
    with pytest.raises(DataFileError, match="cannot read") as err:
        load_hh_rlhf(tmp_path, "harmless-base", "test", cache_dir)
    assert (err.value.path, err.value.line) == (str(path), 1)
    assert str(path) in str(err.value)


def test_truncated_gzip_is_an_error(tmp_path: Path, cache_dir: str) -> None:
    path = write_split(tmp_path, "harmless-base", "test", [pair(f"question {i}?") for i in range(50)])
    path.write_bytes(path.read_bytes()[:-20])
    with pytest.raises(DataFileError, match="cannot read") as err:
        load_hh_rlhf(tmp_path, "harmless-base", "test", cache_dir)
    assert err.value.path == str(path) and err.value.line is not None


def test_bad_json_on_line_3_names_file_and_line(tmp_path: Path, cache_dir: str) -> None:
    lines = [pair("a?"), pair("b?"), '{"chosen": "x", ', pair("c?")]
    path = write_split(tmp_path, "harmless-base", "test", lines)
    with pytest.raises(DataFileError, match="line 3: invalid JSON") as err:
        load_hh_rlhf(tmp_path, "harmless-base", "test", cache_dir)
    assert (err.value.path, err.value.line) == (str(path), 3)


def test_non_object_line_and_non_string_field_are_errors(tmp_path: Path, cache_dir: str) -> None:
    write_split(tmp_path, "harmless-base", "test", [pair("a?"), "[1, 2]"])
    with pytest.raises(DataFileError, match="line 2: expected a JSON object"):
        load_hh_rlhf(tmp_path, "harmless-base", "test", cache_dir)
    write_split(tmp_path, "helpful-base", "test", [{"chosen": 5, "rejected": "x"}])
    with pytest.raises(DataFileError, match="line 1: field 'chosen' must be a string"):
        load_hh_rlhf(tmp_path, "helpful-base", "test", cache_dir)


def test_bad_rows_are_counted_per_reason_and_logged_without_text(
    tmp_path: Path, cache_dir: str, caplog: pytest.LogCaptureFixture
) -> None:
    secret = "zebra-unicorn-secret"
    records: list[dict | str] = [
        pair(f"{secret} one?"),
        {"chosen": dialogue(("Human", "x"), ("Assistant", "y"))},  # rejected missing
        {"chosen": None, "rejected": dialogue(("Human", "x"), ("Assistant", "y"))},  # chosen null
        {"chosen": dialogue(("Human", secret)), "rejected": dialogue(("Human", secret))},  # no assistant turn
        {
            "chosen": dialogue(("Human", "q"), ("Human", "q2"), ("Assistant", "a")),  # merged, kept
            "rejected": dialogue(("Human", "q"), ("Human", "q2"), ("Assistant", "b")),
        },
        pair(f"{secret} one?", "other", "replies"),  # duplicate prompt
    ]
    write_split(tmp_path, "harmless-base", "test", records, gz=False)  # plain .jsonl is accepted too
    with caplog.at_level(logging.INFO, logger="cyclealign_pl.data"):
        rows, stats = load_hh_rlhf(tmp_path, "harmless-base", "test", cache_dir)
    assert stats.rows == 6 and stats.kept == 2 == len(rows)
    assert dict(stats.dropped) == {"missing_field": 2, "no_assistant_turn": 1, "duplicate_prompt": 1}
    assert stats.merged_turns == 2
    assert rows[1]["prompt"] == "\n\nHuman: q\nq2\n\nAssistant:"
    assert [r["id"] for r in rows] == ["harmless-base:test:1", "harmless-base:test:5"]
    assert "missing_field" in caplog.text and "kept 2" in caplog.text
    assert any(r.levelno == logging.WARNING for r in caplog.records)
    assert secret not in caplog.text


def test_row_ids_follow_file_lines_across_blank_lines(tmp_path: Path, cache_dir: str) -> None:
    write_split(tmp_path, "harmless-base", "test", [pair("a?"), "", pair("b?")])
    rows, stats = load_hh_rlhf(tmp_path, "harmless-base", "test", cache_dir)
    assert [r["id"] for r in rows] == ["harmless-base:test:1", "harmless-base:test:3"]
    assert stats.rows == 2


def test_missing_column_in_every_row_is_counted(tmp_path: Path, cache_dir: str) -> None:
    only_chosen = {"chosen": dialogue(("Human", "q"), ("Assistant", "a"))}
    write_split(tmp_path, "harmless-base", "test", [only_chosen] * 3)
    rows, stats = load_hh_rlhf(tmp_path, "harmless-base", "test", cache_dir)
    assert rows == [] and dict(stats.dropped) == {"missing_field": 3}


# ---------------------------------------------------------------------------------- argument checks


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"subsets": ["harmless-base", "helpful-typo"]}, "unknown HH-RLHF subset"),
        ({"subsets": []}, "at least one"),
        ({"subsets": ["helpful-base", "helpful-base"]}, "duplicates"),
        ({"num_train_prompts": 0}, "num_train_prompts must be >= 1"),
        ({"eval_prompts_per_subset": 0}, "eval_prompts_per_subset must be >= 1"),
        ({"batch_size": 0}, "batch_size must be >= 1"),
        ({"eval_batch_size": 0}, "eval_batch_size must be >= 1"),
        ({"num_workers": -1}, "num_workers"),
    ],
)
def test_bad_arguments_fail_at_init(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        HHRLHFDataModule(**kwargs)


# ---------------------------------------------------------------------------------- sampling


def sample_module(cache_dir: str, **kwargs) -> HHRLHFDataModule:
    args = {
        "train_split": "test",
        "num_train_prompts": 50,
        "eval_prompts_per_subset": 20,
        "cache_dir": cache_dir,
    }
    dm = HHRLHFDataModule(**{**args, **kwargs})
    dm.setup("fit")
    return dm


def ids(rows: list) -> list[str]:
    return [r["id"] for r in rows]


def test_shipped_sample_loads_with_default_arguments() -> None:
    assert SAMPLE_ROOT.is_dir() and "shared" not in SAMPLE_ROOT.parts
    dm = HHRLHFDataModule()
    assert Path(dm.root) == SAMPLE_ROOT
    dm.setup("validate")
    stats = dm.cleaning_stats["harmless-base/test"]
    assert (stats.rows, stats.kept) == (300, 292)
    assert len(dm.eval_rows) == 100 and {r["subset"] for r in dm.eval_rows} == {"harmless-base"}
    assert dm.train_rows is None  # validate needs no training prompts
    with pytest.raises(FileNotFoundError, match="train_split='test'"):
        dm.setup("fit")  # the sample has no train split; the error says what to do


def test_same_seed_same_prompts_different_seed_different(cache_dir: str) -> None:
    a, b, c = (sample_module(cache_dir, seed=s) for s in (7, 7, 8))
    assert ids(a.train_rows) == ids(b.train_rows) and ids(a.eval_rows) == ids(b.eval_rows)
    assert set(ids(a.train_rows)) != set(ids(c.train_rows))
    assert set(ids(a.eval_rows)) != set(ids(c.eval_rows))
    assert len(a.train_rows) == 50 and len(a.eval_rows) == 20


def test_train_and_eval_are_disjoint_when_splits_are_equal(cache_dir: str) -> None:
    dm = sample_module(cache_dir, num_train_prompts=None, eval_prompts_per_subset=60)
    train, evaluation = dm.train_rows, dm.eval_rows
    assert not set(ids(train)) & set(ids(evaluation))
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in evaluation}
    assert len(train) + len(evaluation) == dm.cleaning_stats["harmless-base/test"].kept


def test_more_prompts_than_available_gives_all_with_a_warning(cache_dir: str) -> None:
    with pytest.warns(UserWarning, match="num_train_prompts=1000 but only 272"):
        dm = sample_module(cache_dir, num_train_prompts=1000)
    assert len(dm.train_rows) == 292 - 20
    dm = HHRLHFDataModule(train_split="test", eval_prompts_per_subset=500, cache_dir=cache_dir)
    with pytest.warns(UserWarning, match="eval_prompts_per_subset=500 but harmless-base has only 292"):
        dm.setup("validate")
    assert len(dm.eval_rows) == 292


def test_all_rows_for_eval_on_one_split_leaves_no_training_prompts(cache_dir: str) -> None:
    dm = HHRLHFDataModule(train_split="test", eval_prompts_per_subset=None, cache_dir=cache_dir)
    with pytest.raises(ValueError, match="no training prompts left"):
        dm.setup("fit")
    dm.setup("validate")
    assert len(dm.eval_rows) == 292


def test_prompts_leaked_from_eval_split_are_held_out_of_training(tmp_path: Path, cache_dir: str) -> None:
    shared = [pair(f"shared {i}?") for i in range(5)]
    write_split(tmp_path, "harmless-base", "train", [pair(f"train {i}?") for i in range(10)] + shared)
    write_split(tmp_path, "harmless-base", "test", shared)
    dm = HHRLHFDataModule(
        root=str(tmp_path), num_train_prompts=None, eval_prompts_per_subset=None, cache_dir=cache_dir
    )
    dm.setup("fit")
    assert len(dm.eval_rows) == 5 and len(dm.train_rows) == 10
    assert all(r["prompt"].startswith("\n\nHuman: train") for r in dm.train_rows)


def test_several_subsets_are_sampled_and_labelled(tmp_path: Path, cache_dir: str) -> None:
    for subset in ("harmless-base", "helpful-online"):
        write_split(tmp_path, subset, "train", [pair(f"{subset} train {i}?") for i in range(30)])
        write_split(tmp_path, subset, "test", [pair(f"{subset} test {i}?") for i in range(30)])
    dm = HHRLHFDataModule(
        root=str(tmp_path),
        subsets=["harmless-base", "helpful-online"],
        num_train_prompts=40,
        eval_prompts_per_subset=4,
        cache_dir=cache_dir,
    )
    dm.setup("fit")
    assert [r["subset"] for r in dm.eval_rows] == ["harmless-base"] * 4 + ["helpful-online"] * 4
    assert all(r["prompt"].startswith(f"\n\nHuman: {r['subset']} test") for r in dm.eval_rows)
    assert {r["subset"] for r in dm.train_rows} == {"harmless-base", "helpful-online"}
    assert len(dm.train_rows) == 40 and set(dm.cleaning_stats) == {
        "harmless-base/test",
        "helpful-online/test",
        "harmless-base/train",
        "helpful-online/train",
    }


def test_batches_have_the_documented_keys_and_repeat_with_the_seed(cache_dir: str) -> None:
    dm = sample_module(cache_dir, batch_size=4, eval_batch_size=8)
    batch = next(iter(dm.train_dataloader()))
    assert tuple(batch) == BATCH_KEYS
    assert all(len(v) == 4 and all(isinstance(x, str) for x in v) for v in batch.values())
    first_order = [i for b in dm.train_dataloader() for i in b["id"]]
    again = sample_module(cache_dir, batch_size=4)
    assert first_order == [i for b in again.train_dataloader() for i in b["id"]]
    assert sorted(first_order) == sorted(ids(dm.train_rows)) and first_order != ids(dm.train_rows)
    for loader in (dm.val_dataloader(), dm.test_dataloader(), dm.predict_dataloader()):
        seen = [i for b in loader for i in b["id"]]
        assert seen == ids(dm.eval_rows)  # evaluation order is fixed
    assert len(next(iter(dm.val_dataloader()))["prompt"]) == 8


def test_dataloaders_before_setup_say_so() -> None:
    with pytest.raises(RuntimeError, match="call setup"):
        HHRLHFDataModule().train_dataloader()


# ---------------------------------------------------------------------------------- BeaverTails


@pytest.mark.skipif(not BEAVERTAILS_CSV.is_file(), reason="../shared/data is not available")
def test_beavertails_real_file_700_rows_14_categories_of_50(cache_dir: str) -> None:
    dm = BeaverTailsDataModule(path=str(BEAVERTAILS_CSV), cache_dir=cache_dir)
    dm.setup("validate")
    rows = dm.eval_rows
    stats = dm.cleaning_stats["beavertails"]
    assert (stats.rows, stats.kept, stats.num_dropped) == (700, 700, 0)
    per_category: dict[str, int] = {}
    for row in rows:
        per_category[row["subset"]] = per_category.get(row["subset"], 0) + 1
    assert len(per_category) == 14 and set(per_category.values()) == {50}
    assert all(r["prompt"].startswith("\n\nHuman: ") and r["prompt"].endswith("\n\nAssistant:") for r in rows)
    assert all(r["chosen"] == "" == r["rejected"] for r in rows)
    assert len({r["id"] for r in rows}) == 700
    assert tuple(next(iter(dm.val_dataloader()))) == BATCH_KEYS


@pytest.mark.skipif(not BEAVERTAILS_CSV.is_file(), reason="../shared/data is not available")
def test_beavertails_category_filter_and_seeded_sample(cache_dir: str) -> None:
    def module(**kwargs) -> BeaverTailsDataModule:
        dm = BeaverTailsDataModule(path=str(BEAVERTAILS_CSV), cache_dir=cache_dir, **kwargs)
        dm.setup("test")
        return dm

    a, b = module(prompts_per_category=5, seed=1), module(prompts_per_category=5, seed=2)
    assert len(a.eval_rows) == 70 and ids(a.eval_rows) != ids(b.eval_rows)
    assert ids(a.eval_rows) == ids(module(prompts_per_category=5, seed=1).eval_rows)
    only = module(categories=["self_harm", "privacy_violation"])
    assert [r["subset"] for r in only.eval_rows] == ["self_harm"] * 50 + ["privacy_violation"] * 50
    with pytest.raises(ValueError, match="unknown BeaverTails categories"):
        module(categories=["not_a_category"])


def test_beavertails_bad_rows_counted_and_bad_files_named(tmp_path: Path, cache_dir: str) -> None:
    good = tmp_path / "bt.csv"
    good.write_text(
        ',prompt,category,category_id\n0,"Why, though?",a,0\n1,,a,0\n2,"  ",b,1\n3,fine,,2\n4,ok,b,1\n'
    )
    rows, stats = load_beavertails(good, cache_dir)
    expected = ["\n\nHuman: Why, though?\n\nAssistant:", "\n\nHuman: ok\n\nAssistant:"]
    assert [r["prompt"] for r in rows] == expected
    assert [r["id"] for r in rows] == ["beavertails:0", "beavertails:4"]
    assert dict(stats.dropped) == {"empty_prompt": 2, "missing_category": 1} and stats.rows == 5

    no_column = tmp_path / "nocat.csv"
    no_column.write_text("prompt,label\nhi,1\n")
    with pytest.raises(DataFileError, match=r"nocat\.csv, line 1: missing column\(s\) \['category'\]"):
        load_beavertails(no_column, cache_dir)
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    with pytest.raises(DataFileError, match=r"empty\.csv: no header"):
        load_beavertails(empty, cache_dir)
    broken = tmp_path / "broken.csv"
    broken.write_text("prompt,category\nhi,a\nx,b,c,d\n")
    with pytest.raises(DataFileError, match=r"broken\.csv: cannot parse CSV.*line 3"):
        load_beavertails(broken, cache_dir)
    with pytest.raises(FileNotFoundError, match="missing.csv"):
        load_beavertails(tmp_path / "missing.csv", cache_dir)
    with pytest.raises(ValueError, match="not found"):
        BeaverTailsDataModule(path=str(tmp_path / "missing.csv"))
    with pytest.raises(ValueError, match="evaluation-only"):
        BeaverTailsDataModule(path=str(good)).setup("fit")


# ---------------------------------------------------------------------------------- through Lightning


class PromptCounter(LightningModule):
    """The smallest real module that consumes prompt batches: one weight, a loss that touches it."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(()))
        self.train_ids: list[str] = []
        self.eval_subsets: Counter[str] = Counter()

    def training_step(self, batch: dict[str, list[str]], batch_idx: int) -> torch.Tensor:
        self.train_ids.extend(batch["id"])
        return (self.weight - len(batch["prompt"])) ** 2

    def validation_step(self, batch: dict[str, list[str]], batch_idx: int) -> None:
        assert tuple(batch) == BATCH_KEYS
        self.eval_subsets.update(batch["subset"])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def trainer(**kwargs) -> Trainer:
    return Trainer(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **kwargs,
    )


def test_lightning_fit_and_validate_consume_the_data_modules(cache_dir: str) -> None:
    dm = HHRLHFDataModule(
        train_split="test", num_train_prompts=6, eval_prompts_per_subset=10, batch_size=2, cache_dir=cache_dir
    )
    model = PromptCounter()
    trainer(max_epochs=1, num_sanity_val_steps=0).fit(model, datamodule=dm)
    assert sorted(model.train_ids) == sorted(ids(dm.train_rows)) and len(model.train_ids) == 6
    assert model.eval_subsets == {"harmless-base": 10}
    if BEAVERTAILS_CSV.is_file():
        bt = BeaverTailsDataModule(path=str(BEAVERTAILS_CSV), prompts_per_category=2, cache_dir=cache_dir)
        model.eval_subsets.clear()
        trainer().validate(model, datamodule=bt)
        assert len(model.eval_subsets) == 14 and set(model.eval_subsets.values()) == {2}
