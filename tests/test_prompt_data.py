"""Your own prompts: JSONL, CSV, Parquet and dataset directories, plain text and chat messages, held-out and
separate evaluation prompts, bad files (cyclealign_pl.data.prompts)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import yaml

from cyclealign_pl.data import DataFileError
from cyclealign_pl.data.base import PromptDataModuleBase
from cyclealign_pl.data.beavertails import BeaverTailsDataModule
from cyclealign_pl.data.hh_rlhf import HHRLHFDataModule
from cyclealign_pl.data.prompts import PromptDataModule, prompt_of

REPO = Path(__file__).resolve().parents[1]
QUESTIONS = [f"How do I fix problem number {i}?" for i in range(30)]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(tmp_path_factory.mktemp("hf-datasets-cache"))


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def chats(questions: list[str]) -> list[dict]:
    """Conversations: a system message, an earlier exchange, the question, and a reference reply."""
    return [
        {
            "messages": [
                {"role": "system", "content": "Be kind."},
                {"role": "user", "content": "Hi."},
                {"role": "assistant", "content": "Hello!"},
                {"role": "user", "content": q},
                {"role": "assistant", "content": f"Reference reply {i}."},
            ]
        }
        for i, q in enumerate(questions)
    ]


def test_plain_text_and_chat_messages_become_hh_prompts() -> None:
    assert prompt_of("What is 2+2?") == ("\n\nHuman: What is 2+2?\n\nAssistant:", "")
    prompt, reply = prompt_of(chats(["Why?"])[0]["messages"])
    assert prompt == "\n\nHuman: Be kind.\n\nHi.\n\nAssistant: Hello!\n\nHuman: Why?\n\nAssistant:"
    assert reply == "Reference reply 0."
    sharegpt = [
        {"from": "human", "value": "a"},
        {"from": "human", "value": "b"},
        {"from": "gpt", "value": "c"},
    ]
    assert prompt_of(sharegpt) == ("\n\nHuman: a\nb\n\nAssistant:", "c")  # same-speaker turns merged
    assert prompt_of("\n\nHuman: x\n\nAssistant: y\n\nHuman: z\n\nAssistant:") == (
        "\n\nHuman: x\n\nAssistant: y\n\nHuman: z\n\nAssistant:",
        "",
    )
    assert prompt_of(None) == "missing_prompt"
    assert prompt_of("   ") == "empty_prompt"
    assert prompt_of([{"role": "assistant", "content": "only me"}]) == "no_user_turn"
    assert prompt_of([{"role": "narrator", "content": "x"}]) == "bad_messages"
    assert prompt_of([["user", "x"]]) == "bad_messages"


def test_jsonl_of_chat_messages_held_out_evaluation(tmp_path: Path, cache_dir: str) -> None:
    path = write_jsonl(tmp_path / "my_prompts.jsonl", chats(QUESTIONS))
    dm = PromptDataModule(
        str(path), prompt_column="messages", eval_prompts_per_subset=5, batch_size=4, cache_dir=cache_dir
    )
    dm.setup("fit")
    assert len(dm.eval_rows) == 5 and len(dm.train_rows) == 25
    assert not {r["prompt"] for r in dm.eval_rows} & {r["prompt"] for r in dm.train_rows}
    assert {r["subset"] for r in dm.eval_rows} == {"my_prompts"}
    assert all(
        r["prompt"].endswith("\n\nAssistant:") and r["chosen"].startswith("Reference") for r in dm.train_rows
    )
    batch = next(iter(dm.train_dataloader()))
    assert len(batch["prompt"]) == 4 and set(batch) == {"id", "subset", "prompt", "chosen", "rejected"}
    again = PromptDataModule(
        str(path), prompt_column="messages", eval_prompts_per_subset=5, cache_dir=cache_dir
    )
    again.setup("validate")  # the same held-out prompts for validate as for fit
    assert [r["id"] for r in again.eval_rows] == [r["id"] for r in dm.eval_rows] and again.train_rows is None


def test_csv_with_a_category_column_reports_per_category(tmp_path: Path, cache_dir: str) -> None:
    path = tmp_path / "prompts.csv"
    lines = ["question,topic,key"] + [
        f'"{q}",{"cars" if i % 2 else "code"},k{i}' for i, q in enumerate(QUESTIONS)
    ]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    dm = PromptDataModule(
        str(path),
        prompt_column="question",
        subset_column="topic",
        id_column="key",
        num_train_prompts=10,
        eval_prompts_per_subset=3,
        cache_dir=cache_dir,
    )
    dm.setup("fit")
    assert sorted(r["subset"] for r in dm.eval_rows) == ["cars"] * 3 + ["code"] * 3
    assert len(dm.train_rows) == 10 and all(r["id"].startswith("k") for r in dm.train_rows)


def test_parquet_training_with_a_separate_evaluation_file(tmp_path: Path, cache_dir: str) -> None:
    import pandas as pd

    train = tmp_path / "train.parquet"
    pd.DataFrame({"prompt": QUESTIONS[:20]}).to_parquet(train)
    held = write_jsonl(tmp_path / "held_out.jsonl", [{"prompt": q} for q in QUESTIONS[15:]])  # 5 overlap
    dm = PromptDataModule(
        str(train), eval_path=str(held), eval_prompts_per_subset=None, eval_batch_size=4, cache_dir=cache_dir
    )
    dm.setup("fit")
    assert len(dm.eval_rows) == 15 and {r["subset"] for r in dm.eval_rows} == {"held_out"}
    assert len(dm.train_rows) == 15  # the 5 prompts that are also evaluation prompts are left out of training
    assert not {r["prompt"] for r in dm.eval_rows} & {r["prompt"] for r in dm.train_rows}
    assert len({r["id"] for r in dm.eval_rows} | {r["id"] for r in dm.train_rows}) == 30
    assert [len(b["id"]) for b in dm.val_dataloader()] == [4, 4, 4, 3]


def test_a_dataset_by_name_with_its_splits(tmp_path: Path, cache_dir: str) -> None:
    """A name ``datasets.load_dataset`` resolves (here a local dataset directory, as a hub name offline)."""
    root = tmp_path / "my-dataset"
    root.mkdir()
    write_jsonl(root / "train.jsonl", [{"text": q} for q in QUESTIONS[:20]])
    write_jsonl(root / "test.jsonl", [{"text": q} for q in QUESTIONS[20:]])
    dm = PromptDataModule(
        str(root), prompt_column="text", eval_split="test", eval_prompts_per_subset=None, cache_dir=cache_dir
    )
    dm.setup("fit")
    assert (len(dm.train_rows), len(dm.eval_rows)) == (20, 10)
    assert all(r["id"].endswith("@test") for r in dm.eval_rows)


def test_bad_rows_are_counted_and_bad_files_named(tmp_path: Path, cache_dir: str, caplog) -> None:
    records = [{"prompt": "fine"}, {"prompt": ""}, {"prompt": None}, {"prompt": "fine"}, {"prompt": "other"}]
    path = write_jsonl(tmp_path / "p.jsonl", records)
    with caplog.at_level(logging.WARNING, logger="cyclealign_pl.data.prompts"):
        dm = PromptDataModule(str(path), eval_prompts_per_subset=1, cache_dir=cache_dir)
        dm.setup("fit")
    stats = dm.cleaning_stats[str(path)]
    assert (stats.rows, stats.kept) == (5, 2)
    assert dict(stats.dropped) == {"empty_prompt": 1, "missing_prompt": 1, "duplicate_prompt": 1}
    assert "dropped 3" in caplog.text and "fine" not in caplog.text  # counts, never the text

    with pytest.raises(
        DataFileError, match=r"p\.jsonl: no column\(s\) \['question'\]; the columns are \['prompt'\]"
    ):
        PromptDataModule(str(path), prompt_column="question", cache_dir=cache_dir).setup("fit")
    empty = write_jsonl(tmp_path / "empty.jsonl", [{"prompt": ""}, {"prompt": "  "}])
    with pytest.raises(DataFileError, match="no usable prompts in column 'prompt': all 2 rows were dropped"):
        PromptDataModule(str(empty), cache_dir=cache_dir).setup("fit")
    with pytest.raises(ValueError, match="prompt file not found: .*nope.jsonl"):
        PromptDataModule(str(tmp_path / "nope.jsonl"))
    (tmp_path / "p.txt").write_text("hello\n")
    with pytest.raises(ValueError, match=r"unknown file type \.txt"):
        PromptDataModule(str(tmp_path / "p.txt"))
    with pytest.raises(ValueError, match="held out of the training data, say how many"):
        PromptDataModule(str(path), eval_prompts_per_subset=None)
    with pytest.raises(ValueError, match=r"eval_split='test': the file .*p\.jsonl has one split"):
        PromptDataModule(str(path), eval_split="test")


def test_the_data_modules_share_one_base_class() -> None:
    for cls in (HHRLHFDataModule, BeaverTailsDataModule, PromptDataModule):
        assert issubclass(cls, PromptDataModuleBase)
        for name in ("train_dataloader", "val_dataloader", "test_dataloader", "predict_dataloader"):
            assert name not in vars(cls), f"{cls.__name__} repeats {name}"
    with pytest.raises(ValueError, match="eval_batch_size must be >= 1"):
        BeaverTailsDataModule(eval_batch_size=0)


def test_the_shipped_prompts_config_trains_on_the_example_file(capsys, monkeypatch) -> None:
    """configs/prompts.yaml after tiny.yaml: the example file, and none of HH-RLHF's settings remain."""
    from cyclealign_pl.cli import main

    monkeypatch.chdir(REPO)
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", "configs/tiny.yaml", "--config", "configs/prompts.yaml", "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    data = printed["data"]
    assert data["class_path"] == "cyclealign_pl.data.prompts.PromptDataModule"
    dm = PromptDataModule(**data["init_args"])
    dm.setup("fit")
    assert (len(dm.train_rows), len(dm.eval_rows)) == (60, 20)
    assert printed["trainer"]["limit_val_batches"] is None
