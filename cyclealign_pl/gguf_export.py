"""The aligned white box as a GGUF file, the format llama.cpp, llama-cpp-python and Ollama serve.

Written with the ``gguf`` package (llama.cpp's own writer and tensor-name map; the ``local`` extra) for
Llama-architecture models; the rotary layout and tokenizer metadata it takes care of: docs/real_models.md.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)

TENSOR_TYPES = ("f32", "f16", "bf16", "q8_0")


class GGUFExportError(ValueError):
    """The model cannot be written as a GGUF; the message says why (one line)."""


def _gguf():
    try:
        import gguf
    except ImportError as error:
        raise GGUFExportError("--gguf needs the package gguf: pip install -e '.[local]'") from error
    return gguf


def _interleave_rotary(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows of a query/key projection reordered per head from Hugging Face's rotary layout (first half, second
    half) to llama.cpp's (pairs side by side)."""
    rows, columns = weight.shape
    half = rows // heads // 2
    return weight.reshape(heads, 2, half, columns).transpose(1, 2).reshape(rows, columns)


def _rope_theta(config: Any) -> float:
    """The rotary base, refusing rotary scalings that need tensors this writer does not make."""
    params = getattr(config, "rope_parameters", None) or {}
    kind = params.get("rope_type", "default") if isinstance(params, dict) else "default"
    scaling = getattr(config, "rope_scaling", None)
    scaled = isinstance(scaling, dict) and scaling.get("rope_type", "default") != "default"
    if kind != "default" or scaled:
        raise GGUFExportError(
            f"rotary scaling {kind!r} is not supported by the GGUF export; use llama.cpp's "
            "convert_hf_to_gguf.py"
        )
    theta = params.get("rope_theta") if isinstance(params, dict) else None
    return float(theta if theta is not None else getattr(config, "rope_theta", 10000.0))


def _copy_tokenizer_fields(writer: Any, source: Path) -> None:
    """Every ``tokenizer.*`` field of the GGUF the white box came from, unchanged."""
    gguf = _gguf()
    reader = gguf.GGUFReader(str(source))
    for name, field in reader.fields.items():
        if not name.startswith("tokenizer."):
            continue
        kind = field.types[0]
        sub_type = field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(name, field.contents(), kind, sub_type=sub_type)


def _hf_tokenizer_fields(writer: Any, tokenizer_dir: Path) -> None:
    """Tokenizer metadata from Hugging Face tokenizer files (``gguf.vocab``): SentencePiece-style Llama
    tokenizers as ``llama``, byte-level BPE ones as ``gpt2``."""
    gguf = _gguf()
    spec = (
        json.loads((tokenizer_dir / "tokenizer.json").read_text())
        if (tokenizer_dir / "tokenizer.json").is_file()
        else {}
    )
    model = spec.get("model", {})
    if model.get("type") == "BPE" and model.get("byte_fallback"):
        vocab, kind = gguf.LlamaHfVocab(tokenizer_dir), "llama"
    elif model.get("type") == "BPE":
        vocab, kind = gguf.BpeVocab(tokenizer_dir), "gpt2"
        log.warning(
            "GGUF export: a byte-level BPE tokenizer gets llama.cpp's default pre-tokenizer; check the "
            "replies of the GGUF (llama.cpp's convert_hf_to_gguf.py knows the pre-tokenizers of named models)"
        )
    elif (tokenizer_dir / "tokenizer.model").is_file():
        vocab, kind = gguf.SentencePieceVocab(tokenizer_dir), "llama"
    else:
        raise GGUFExportError(
            f"the tokenizer in {tokenizer_dir} is neither BPE (tokenizer.json) nor SentencePiece; use "
            "llama.cpp's convert_hf_to_gguf.py"
        )
    tokens, scores, types = [], [], []
    for text, score, token_type in vocab.all_tokens():
        tokens.append(text)
        scores.append(score)
        types.append(token_type)
    writer.add_tokenizer_model(kind)
    if kind == "gpt2":
        writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    gguf.SpecialVocab(tokenizer_dir, load_merges=kind == "gpt2", n_vocab=len(tokens)).add_to_gguf(
        writer, quiet=True
    )


def write_gguf(
    model: torch.nn.Module,
    out_file: str | Path,
    tokenizer_dir: str | Path,
    tensor_type: str = "f16",
    source_gguf: str | Path | None = None,
    name: str | None = None,
) -> Path:
    """Write ``model`` (a Llama-architecture causal LM) as a GGUF file; the tokenizer comes from the GGUF the
    model was converted from (``source_gguf``) or from the Hugging Face files in ``tokenizer_dir``."""
    gguf = _gguf()
    config = model.config
    _check_exportable(config, tensor_type)
    out_file = Path(out_file)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(out_file), gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    _add_model_fields(writer, config, tensor_type, name)
    if source_gguf is not None:
        _copy_tokenizer_fields(writer, Path(source_gguf))
    else:
        _hf_tokenizer_fields(writer, Path(tokenizer_dir))
    _add_tensors(writer, model, tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out_file


def _check_exportable(config: Any, tensor_type: str) -> None:
    """A known tensor type and a Llama-architecture model, else one line saying why not."""
    if tensor_type not in TENSOR_TYPES:
        raise GGUFExportError(
            f"unknown GGUF tensor type {tensor_type!r}; choose one of {', '.join(TENSOR_TYPES)}"
        )
    if getattr(config, "model_type", None) != "llama":
        raise GGUFExportError(
            f"the GGUF export writes Llama-architecture models; this one is {config.model_type!r}: export "
            "the Hugging Face folder and use llama.cpp's convert_hf_to_gguf.py"
        )


def _gguf_types(tensor_type: str) -> tuple[Any, Any]:
    """The matrices' GGML tensor type and the file type the header declares for ``tensor_type``."""
    gguf = _gguf()
    return {
        "f32": (gguf.GGMLQuantizationType.F32, gguf.LlamaFileType.ALL_F32),
        "f16": (gguf.GGMLQuantizationType.F16, gguf.LlamaFileType.MOSTLY_F16),
        "bf16": (gguf.GGMLQuantizationType.BF16, gguf.LlamaFileType.MOSTLY_BF16),
        "q8_0": (gguf.GGMLQuantizationType.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
    }[tensor_type]


def _head_counts(config: Any) -> tuple[int, int, int]:
    """Query heads, key/value heads and the dimension of a head."""
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return heads, kv_heads, head_dim


def _add_model_fields(writer: Any, config: Any, tensor_type: str, name: str | None) -> None:
    """The model's ``llama.*`` and ``general.*`` metadata: its shape, rotary base, norm epsilon, file type."""
    gguf = _gguf()
    heads, kv_heads, head_dim = _head_counts(config)
    file_type = _gguf_types(tensor_type)[1]
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name or getattr(config, "_name_or_path", None) or "cyclealign white box")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(_rope_theta(config))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(file_type)


def _add_tensors(writer: Any, model: torch.nn.Module, tensor_type: str) -> None:
    """Every weight under its GGUF name: query/key rows in llama.cpp's rotary layout, norms (1-D) in float32,
    matrices as ``tensor_type``; a tied output head is left out (llama.cpp reuses the embeddings)."""
    gguf = _gguf()
    config = model.config
    heads, kv_heads, _ = _head_counts(config)
    quant = _gguf_types(tensor_type)[0]
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    for hf_name, tensor in model.state_dict().items():
        if tied and hf_name == "lm_head.weight":
            continue  # llama.cpp uses the token embeddings as the output head when there is none
        if "rotary_emb" in hf_name:
            continue
        target = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if target is None:
            raise GGUFExportError(
                f"no GGUF tensor name for {hf_name!r} (a Llama variant this export does not know)"
            )
        data = tensor.detach().to(torch.float32).cpu()
        if hf_name.endswith("q_proj.weight"):
            data = _interleave_rotary(data, heads)
        elif hf_name.endswith("k_proj.weight"):
            data = _interleave_rotary(data, kv_heads)
        array = data.numpy()
        if array.ndim == 1 or quant == gguf.GGMLQuantizationType.F32:
            writer.add_tensor(target, array.astype(np.float32))
        elif quant == gguf.GGMLQuantizationType.F16:
            writer.add_tensor(target, array.astype(np.float16))
        else:
            writer.add_tensor(target, gguf.quants.quantize(array, quant), raw_dtype=quant)
