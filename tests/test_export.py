"""Exports: a failed end-of-fit export is one line and an exit status, with the checkpoints kept."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from cyclealign_pl.cli import main
from cyclealign_pl.summary import EXIT_EXPORT_FAILED
from tests.helpers import Capture, cli_args


@pytest.mark.slow
def test_a_failed_end_of_fit_export_is_one_line_with_the_checkpoints_kept(tmp_path: Path, caplog):
    blocked = tmp_path / "not_a_directory"
    blocked.write_text("a file where the export wants a directory")
    run_dir = tmp_path / "run"
    args = cli_args(
        run_dir,
        "--trainer.limit_train_batches",
        "2",
        "--trainer.limit_val_batches",
        "0",
        "--export.dirpath",
        str(blocked),
    )
    with caplog.at_level(logging.ERROR), Capture() as captured, pytest.raises(SystemExit) as exit_info:
        main(["fit", *args])
    assert exit_info.value.code == EXIT_EXPORT_FAILED
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "\n" not in errors[0], errors
    assert f"the end-of-fit export to {blocked} failed" in errors[0] and "checkpoints are kept" in errors[0]
    assert "Traceback" not in captured.err
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert "exported model" not in captured.out  # the summary names no export that does not exist


def test_the_gguf_export_writes_llama_tensors_that_read_back_to_the_same_weights(tmp_path: Path):
    """A tiny Llama (grouped-query attention, untied head) with an offline BPE chat tokenizer: the GGUF that
    ``write_gguf`` makes reads back in transformers (which undoes llama.cpp's rotary row order) to the same
    weights and vocabulary, and keeps the chat template and EOS."""
    gguf = pytest.importorskip("gguf", reason="the GGUF export needs the `local` extra (gguf)")
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from cyclealign_pl.gguf_export import write_gguf
    from tests.helpers import QUESTIONS, TINY_LLAMA, chat_tokenizer, hh_prompt

    tokenizer = chat_tokenizer([f"{hh_prompt(q)} Sure, glad to help." for q in QUESTIONS])
    settings = {k: v for k, v in TINY_LLAMA.items() if k != "model_type"}
    settings.update(num_key_value_heads=2, tie_word_embeddings=False)
    config = AutoConfig.for_model(
        "llama", vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id, **settings
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    tokenizer.save_pretrained(tmp_path)
    out = write_gguf(model, tmp_path / "model.gguf", tmp_path, "f32")
    back = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=out.name)
    expected, read = model.state_dict(), back.state_dict()
    assert set(read) == set(expected)
    for name, tensor in expected.items():
        assert torch.equal(read[name], tensor), name
    assert AutoTokenizer.from_pretrained(tmp_path, gguf_file=out.name).get_vocab() == tokenizer.get_vocab()
    fields = gguf.GGUFReader(str(out)).fields
    assert fields["tokenizer.chat_template"].contents() == tokenizer.chat_template
    assert fields["tokenizer.ggml.eos_token_id"].contents() == tokenizer.eos_token_id


def test_a_gguf_export_whose_source_gguf_is_gone_takes_the_tokenizer_from_the_exported_files(
    tmp_path: Path, caplog
):
    """A white box converted from a GGUF that was deleted since: the export says so and writes the GGUF with
    the tokenizer fields of the exported Hugging Face files, instead of failing."""
    gguf = pytest.importorskip("gguf", reason="the GGUF export needs the `local` extra (gguf)")
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from cyclealign_pl.export import write_gguf_of
    from tests.helpers import QUESTIONS, TINY_LLAMA, chat_tokenizer, hh_prompt

    tokenizer = chat_tokenizer([f"{hh_prompt(q)} Sure." for q in QUESTIONS])
    settings = {k: v for k, v in TINY_LLAMA.items() if k != "model_type"}
    config = AutoConfig.for_model("llama", vocab_size=len(tokenizer), **settings)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    tokenizer.save_pretrained(tmp_path)
    with caplog.at_level("WARNING", logger="cyclealign_pl.export"):
        out = write_gguf_of(model, str(tmp_path / "deleted.gguf"), tmp_path, "f32")
    assert "GGUF file not found" in caplog.text and "exported tokenizer files" in caplog.text
    fields = gguf.GGUFReader(str(out)).fields
    assert len(fields["tokenizer.ggml.tokens"].contents()) == len(tokenizer)
    assert fields["tokenizer.chat_template"].contents() == tokenizer.chat_template
