"""``python -m cyclealign_pl export CHECKPOINT OUT_DIR``: a plain Hugging Face model from any checkpoint.

A ``.ckpt`` file or a DeepSpeed ZeRO directory (consolidated first); LoRA adapters are merged, so the export
loads without this package; ``--gguf`` adds a GGUF for llama.cpp and Ollama. Details: docs/commands.md.
"""

from __future__ import annotations

import logging
import sys
import tempfile
from pathlib import Path

from cyclealign_pl.cli_parser import OneLineArgumentParser
from cyclealign_pl.commands import fail, parser_names

log = logging.getLogger(__name__)


class ExportError(ValueError):
    """The checkpoint cannot be exported; the message names the path and what is wrong."""


def consolidate_zero_checkpoint(directory: Path, output_file: Path) -> Path:
    """One fp32 Lightning checkpoint file from a DeepSpeed ZeRO checkpoint directory."""
    if not (directory / "latest").is_file() and not any(directory.glob("*/mp_rank_*_model_states.pt")):
        raise ExportError(
            f"{directory} is a directory but not a DeepSpeed ZeRO checkpoint: expected a 'latest' "
            "file or '<tag>/mp_rank_00_model_states.pt' inside it"
        )
    from lightning.pytorch.utilities.deepspeed import convert_zero_checkpoint_to_fp32_state_dict

    convert_zero_checkpoint_to_fp32_state_dict(str(directory), str(output_file))
    return output_file


GGUF_NAME = "model.gguf"


def export_checkpoint(checkpoint: str | Path, out_dir: str | Path, gguf_type: str | None = None) -> Path:
    """Write the white-box of ``checkpoint`` (file or ZeRO directory) to ``out_dir`` with
    ``save_pretrained``, and as ``out_dir/model.gguf`` when ``gguf_type`` is given."""
    from cyclealign_pl.hf import plain_model
    from cyclealign_pl.module import CycleAlignModule

    checkpoint, out_dir = Path(checkpoint), Path(out_dir)
    if not checkpoint.exists():
        raise ExportError(f"checkpoint not found: {checkpoint}")
    with tempfile.TemporaryDirectory() as scratch:
        path = checkpoint
        if checkpoint.is_dir():
            path = consolidate_zero_checkpoint(checkpoint, Path(scratch) / "consolidated.ckpt")
        try:
            module = CycleAlignModule.load_from_checkpoint(str(path), map_location="cpu", weights_only=False)
        except (KeyError, RuntimeError, EOFError) as error:
            raise ExportError(f"{checkpoint} is not a CycleAlign checkpoint: {error}") from error
    if out_dir.exists() and not out_dir.is_dir():
        raise ExportError(f"{out_dir} exists and is not a directory")
    model = plain_model(module.model)
    model.save_pretrained(out_dir)
    module.tokenizer.save_pretrained(out_dir)
    if gguf_type is not None:
        write_gguf_of(model, module.hparams.get("model"), out_dir, gguf_type)
    return out_dir


def write_gguf_of(model, source: str | None, out_dir: Path, gguf_type: str) -> Path:
    """``out_dir/model.gguf`` of an exported white box; a model that came from a GGUF keeps its tokenizer
    fields (``source``: the checkpoint's ``model`` setting), or, when that GGUF is gone, takes them from the
    exported tokenizer files."""
    from cyclealign_pl.gguf_export import GGUFExportError, write_gguf
    from cyclealign_pl.local_models import LocalModelError, is_gguf_name, resolve_gguf

    original = None
    if is_gguf_name(source):
        try:
            original = resolve_gguf(source)
        except LocalModelError as gone:
            log.warning("%s: the tokenizer fields come from the exported tokenizer files instead", gone)
    try:
        return write_gguf(model, out_dir / GGUF_NAME, out_dir, gguf_type, source_gguf=original)
    except (GGUFExportError, LocalModelError) as error:
        raise ExportError(f"GGUF export: {error}") from error


def check_export(out_dir: str | Path) -> str:
    """Load the exported model and tokenizer as a user would (plain transformers); what was loaded."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(out_dir)
        AutoTokenizer.from_pretrained(out_dir)
    except (OSError, ValueError) as error:
        raise ExportError(f"the export in {out_dir} does not load in transformers: {error}") from error
    return f"{type(model).__name__}, {sum(p.numel() for p in model.parameters()):,} parameters"


def main(argv: list[str] | None = None) -> None:
    parser = OneLineArgumentParser(**parser_names("export"))
    parser.add_argument("checkpoint", help="a .ckpt file or a DeepSpeed ZeRO checkpoint directory")
    parser.add_argument("out_dir", help="where to write the Hugging Face model and tokenizer")
    parser.add_argument(
        "--gguf", action="store_true", help=f"also write OUT_DIR/{GGUF_NAME} for llama.cpp and Ollama"
    )
    parser.add_argument(
        "--gguf_type",
        default="f16",
        choices=["f32", "f16", "bf16", "q8_0"],
        help="the GGUF's matrix type (norms stay f32); default f16",
    )
    args = parser.parse_args(argv)
    try:
        out = export_checkpoint(args.checkpoint, args.out_dir, args.gguf_type if args.gguf else None)
        loaded = check_export(out)
    except ExportError as error:
        fail(str(error))
    print(
        f"exported {args.checkpoint} -> {out} ({loaded}; it loads with AutoModelForCausalLM.from_pretrained)",
        file=sys.stderr,
    )
    if args.gguf:
        print(
            f"GGUF ({args.gguf_type}): {out / GGUF_NAME} (serve it with python -m llama_cpp.server --model "
            f"{out / GGUF_NAME}; Ollama: a Modelfile with FROM {out / GGUF_NAME})",
            file=sys.stderr,
        )


if __name__ == "__main__":
    main()
