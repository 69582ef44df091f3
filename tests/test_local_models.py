"""GGUF white boxes by path or packaged name: converted once into a cached plain Hugging Face folder (keyed
by the file's hash), so that ``save_pretrained`` (the end-of-fit export) works; clear errors otherwise."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cyclealign_pl.hf import ModelLoadError, load_causal_lm, load_tokenizer
from cyclealign_pl.local_models import SOURCE_FILE, cache_dir, gguf_source, is_gguf_name, prepare_gguf


def test_the_cache_respects_its_own_variable_then_hf_home_then_xdg(monkeypatch, tmp_path):
    for name in ("CYCLEALIGN_PL_CACHE", "HF_HOME", "XDG_CACHE_HOME"):
        monkeypatch.delenv(name, raising=False)
    assert cache_dir() == Path("~/.cache/huggingface/cyclealign_pl").expanduser()
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "huggingface" / "cyclealign_pl"
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    assert cache_dir() == tmp_path / "hf" / "cyclealign_pl"
    monkeypatch.setenv("CYCLEALIGN_PL_CACHE", str(tmp_path / "own"))
    assert cache_dir() == tmp_path / "own"


def test_gguf_names_and_missing_files_are_one_line_errors(tmp_path):
    assert is_gguf_name("local:smollm2-135m-instruct") and is_gguf_name("/models/x.GGUF")
    assert not is_gguf_name("builtin:whitebox") and not is_gguf_name("huggyllama/llama-7b")
    with pytest.raises(ModelLoadError, match="GGUF file not found"):
        load_causal_lm(str(tmp_path / "absent.gguf"))
    with pytest.raises(ModelLoadError, match="no packaged GGUF model 'local:nope'; known: local:smollm2"):
        load_tokenizer("local:nope")


def test_a_gguf_is_converted_once_into_a_plain_folder_that_saves(monkeypatch, tmp_path):
    """A tiny Llama written as GGUF (the project's own writer) loads by path: the first load converts it into
    the cache (no ``quantization_config``, so ``save_pretrained`` works), later loads read the folder, and a
    changed file gets a folder of its own."""
    pytest.importorskip("gguf", reason="GGUF models need the `local` extra (gguf)")
    from transformers import AutoConfig, AutoModelForCausalLM

    from cyclealign_pl.gguf_export import write_gguf
    from tests.helpers import QUESTIONS, TINY_LLAMA, chat_tokenizer, hh_prompt

    monkeypatch.setenv("CYCLEALIGN_PL_CACHE", str(tmp_path / "cache"))
    tokenizer = chat_tokenizer([f"{hh_prompt(q)} Sure, glad to help." for q in QUESTIONS])
    settings = {k: v for k, v in TINY_LLAMA.items() if k != "model_type"}
    config = AutoConfig.for_model(
        "llama", vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id, **settings
    )
    torch.manual_seed(0)
    original = AutoModelForCausalLM.from_config(config)
    tokenizer.save_pretrained(tmp_path / "hf")
    gguf_file = write_gguf(original, tmp_path / "tiny.gguf", tmp_path / "hf", "f32")

    model = load_causal_lm(str(gguf_file))
    folders = list((tmp_path / "cache" / "gguf").iterdir())
    assert len(folders) == 1 and folders[0].name.startswith("tiny-")
    assert "quantization_config" not in (folders[0] / "config.json").read_text()
    assert gguf_source(folders[0]) == gguf_file and (folders[0] / SOURCE_FILE).is_file()
    for name, tensor in original.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name
    model.save_pretrained(tmp_path / "saved")  # what a GGUF-loaded model refuses
    assert (tmp_path / "saved" / "config.json").is_file()
    read_vocab = load_tokenizer(str(gguf_file)).get_vocab()  # transformers may add a default <|endoftext|>
    assert {token: read_vocab.get(token) for token in tokenizer.get_vocab()} == tokenizer.get_vocab()

    written = (folders[0] / "model.safetensors").stat().st_mtime_ns
    import cyclealign_pl.local_models as local_models

    monkeypatch.setattr(local_models, "_prepared", {})  # a new process: only the cache on disk
    assert prepare_gguf(str(gguf_file)) == folders[0]
    assert (folders[0] / "model.safetensors").stat().st_mtime_ns == written

    with torch.no_grad():
        original.model.norm.weight.mul_(2)
    write_gguf(original, gguf_file, tmp_path / "hf", "f32")
    changed = prepare_gguf(str(gguf_file))
    assert changed != folders[0] and len(list((tmp_path / "cache" / "gguf").iterdir())) == 2
