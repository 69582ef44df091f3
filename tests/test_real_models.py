"""The real-model path (docs/real_models.md), with the ``local`` extra: SmolLM2-135M-Instruct from its
packaged GGUF as the white box (converted once, cached), a short fit through the CLI, the end-of-fit export,
and the GGUF export served by llama.cpp (llama-cpp-python) with the trained model's greedy replies."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
import yaml

from cyclealign_pl.local_models import SOURCE_FILE, LocalModelError, file_hash, prepare_gguf, resolve_gguf
from tests.helpers import Capture, cli_args, hh_prompt

SMOLLM2 = "local:smollm2-135m-instruct"
CONFIG = Path(__file__).resolve().parents[1] / "configs" / "smollm2.yaml"


def _missing() -> str | None:
    if importlib.util.find_spec("gguf") is None:
        return "the `local` extra is not installed (gguf): pip install -e '.[local]'"
    try:
        resolve_gguf(SMOLLM2)
    except LocalModelError as error:
        return str(error)
    return None


pytestmark = [
    pytest.mark.skipif(_missing() is not None, reason=_missing() or ""),
    pytest.mark.xdist_group("smollm2"),  # one worker: one conversion, one model in memory at a time
]


@pytest.fixture(scope="module")
def smollm2_dir() -> Path:
    """The converted folder (made once per machine, in the cache: docs/real_models.md)."""
    return prepare_gguf(SMOLLM2)


def test_the_packaged_gguf_becomes_a_plain_cached_hugging_face_chat_model(smollm2_dir):
    from cyclealign_pl.hf import load_causal_lm, load_tokenizer
    from cyclealign_pl.policy import WhiteBox

    config = json.loads((smollm2_dir / "config.json").read_text())
    assert "quantization_config" not in config and config["model_type"] == "llama"
    source = json.loads((smollm2_dir / SOURCE_FILE).read_text())  # the same file, wherever it was installed
    assert Path(source["gguf"]).name == resolve_gguf(SMOLLM2).name
    assert source["sha256_16"] == file_hash(resolve_gguf(SMOLLM2))
    weights = smollm2_dir / "model.safetensors"
    written = weights.stat().st_mtime_ns
    model, tokenizer = load_causal_lm(SMOLLM2), load_tokenizer(SMOLLM2)
    assert weights.stat().st_mtime_ns == written  # read from the cache, not converted again
    assert type(model).__name__ == "LlamaForCausalLM" and model.dtype == torch.float32
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(134.5e6, rel=0.01)
    whitebox = WhiteBox(model, tokenizer, max_length=256)
    assert whitebox.chat and tokenizer.convert_ids_to_tokens(whitebox.eos_id) == "<|im_end|>"
    replies = whitebox.greedy([hh_prompt("What is the capital of France?")], max_new_tokens=24)
    assert "Paris" in replies[0]  # a pretrained chat model answering through its template


def _fit_config(tmp_path: Path) -> Path:
    """configs/smollm2.yaml as shipped, but for seconds: 2 prompts of 1 iteration, short replies, a
    weights-only checkpoint, and a cheap judge (the lexicon rule behind a loopback server) instead of the
    135M LLM judge."""
    config = yaml.safe_load(CONFIG.read_text())
    config["model"]["judge"] = {
        "class_path": "cyclealign_pl.demo.judge.LexiconJudge",
        "init_args": {"seed": 0},
    }
    config["model"]["cycle"]["max_iterations"] = 1
    config["model"]["sampling"]["max_new_tokens"] = 12
    config["model"]["whitebox"]["max_length"] = 160
    config["trainer"]["limit_train_batches"] = 2
    config["trainer"]["limit_val_batches"] = 0  # the evaluator has its own tests (test_evaluators.py)
    checkpoints = config["trainer"]["callbacks"][0]["init_args"]
    checkpoints.update(every_n_batches=None, save_weights_only=True)  # one 0.5 GB file, not 1.6 GB twice
    path = tmp_path / "smollm2_quick.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.slow
def test_a_short_fit_of_smollm2_exports_a_gguf_that_llama_cpp_serves_with_the_same_greedy_replies(
    smollm2_dir, tmp_path
):
    from cyclealign_pl.cli import main
    from cyclealign_pl.export import GGUF_NAME, export_checkpoint

    run_dir = tmp_path / "run"
    with Capture() as captured:
        cli = main(["fit", *cli_args(run_dir, config=_fit_config(tmp_path))])
    module = cli.model
    assert module.whitebox.chat and module.counters.optimizer_steps > 0, captured.err[-2000:]
    exported = run_dir / "logs" / "version_0" / "hf_model"  # the end-of-fit export of a GGUF-born white box
    assert (exported / "model.safetensors").is_file() and json.loads((exported / "config.json").read_text())
    assert "quantization_config" not in json.loads((exported / "config.json").read_text())
    out = export_checkpoint(run_dir / "checkpoints" / "last.ckpt", tmp_path / "out", gguf_type="f32")
    if importlib.util.find_spec("llama_cpp") is None:
        pytest.skip("llama-cpp-python is not installed: the GGUF was written but not served")
    from llama_cpp import Llama

    whitebox = module.whitebox  # the trained model in memory: the GGUF is written from its checkpoint
    prompts = [hh_prompt(q) for q in ("What is the capital of France?", "How do I bake bread?", "Say hi.")]
    expected = whitebox.greedy(prompts, max_new_tokens=16)
    served = Llama(model_path=str(out / GGUF_NAME), n_ctx=512, n_threads=2, verbose=False, seed=0)
    try:
        for prompt, reply in zip(prompts, expected):
            ids = whitebox.prompt_ids(prompt)
            text = whitebox.tokenizer.decode(ids)
            assert served.tokenize(text.encode(), add_bos=False, special=True) == ids  # the same tokenizer
            completion = served.create_completion(ids, max_tokens=16, temperature=0.0, top_k=1)
            assert completion["choices"][0]["text"].strip() == reply
    finally:
        served.close()
