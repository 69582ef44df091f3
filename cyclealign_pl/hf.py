"""Loading Hugging Face models and tokenizers: from a path/hub name, or built from a config
(tests, CPU default).

One place for the error messages users see when a path is wrong, so every caller fails the same clear way.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
)

from cyclealign_pl.hub import require_hub
from cyclealign_pl.local_models import LocalModelError, is_gguf_name, prepare_gguf

OFFLINE_TOKENIZER = "byt5"  # ByT5's byte tokenizer needs no files: the offline default for tiny models


class ModelLoadError(ValueError):
    """A model or tokenizer could not be loaded; the message names the path and the likely cause."""


BUILTIN_PREFIX = "builtin:"  # "builtin:whitebox": a model shipped in the package (cyclealign_pl/demo/assets)
LOCAL_COPY = "its directory's path in place of the name"


def resolve_builtin(name: str) -> str:
    """The directory of a packaged model named ``builtin:<name>``, so that configs work from any directory and
    after ``pip install``; a GGUF (``local:<name>`` or a ``.gguf`` path) is converted once into a cached
    Hugging Face folder (``local_models.prepare_gguf``); any other name is returned unchanged."""
    if is_gguf_name(name):
        try:
            return str(prepare_gguf(name))
        except LocalModelError as error:
            raise ModelLoadError(str(error)) from error
    if not name.startswith(BUILTIN_PREFIX):
        return name
    assets = Path(__file__).resolve().parent / "demo" / "assets"
    path = assets / name[len(BUILTIN_PREFIX) :]
    if not (path / "config.json").is_file():
        shipped = sorted(p.name for p in assets.glob("*") if (p / "config.json").is_file())
        names = ", ".join(BUILTIN_PREFIX + s for s in shipped) or "none"
        raise ModelLoadError(f"no packaged model {name!r}; the package ships: {names}")
    return str(path)


def _explain(kind: str, name: str, error: Exception) -> ModelLoadError:
    hint = (
        ""
        if Path(name).exists()
        else " (not a local directory; a hub name needs network access or a local cache)"
    )
    return ModelLoadError(f"could not load {kind} {name!r}{hint}: {error}")


def load_tokenizer(name: str):
    """``"byt5"`` builds the file-free byte tokenizer; anything else goes to
    ``AutoTokenizer.from_pretrained``."""
    if name == OFFLINE_TOKENIZER:
        from transformers import ByT5Tokenizer

        return ByT5Tokenizer()
    name = resolve_builtin(name)
    require_hub(name, "tokenizer", LOCAL_COPY)
    try:
        return AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as error:
        raise _explain("tokenizer", name, error) from error


def build_config(config: dict[str, Any], **overrides: Any):
    """A transformers config from a plain dict with a ``model_type`` key
    (e.g. ``{"model_type": "llama", ...}``)."""
    settings = dict(config)
    model_type = settings.pop("model_type", None)
    if not model_type:
        raise ModelLoadError(
            f"a model config needs a 'model_type' key (e.g. 'llama'), got keys {sorted(config)}"
        )
    settings.update(overrides)
    try:
        return AutoConfig.for_model(model_type, **settings)
    except (ValueError, TypeError) as error:
        raise ModelLoadError(f"invalid model config {config!r}: {error}") from error


def _init_from_config(auto_cls, config, seed: int, dtype: str | None = None) -> PreTrainedModel:
    """A freshly initialised model (in ``dtype`` when given, e.g. ``"bfloat16"``), seeded without touching the
    run's random streams."""
    options = {"dtype": getattr(torch, dtype, None)} if dtype not in (None, "auto") else {}
    if options and not isinstance(options["dtype"], torch.dtype):
        raise ModelLoadError(f"unknown dtype {dtype!r}: use e.g. 'float32', 'bfloat16' or 'float16'")
    with torch.random.fork_rng(devices=[]):  # a built model must not shift the run's RNG stream
        torch.manual_seed(seed)
        return auto_cls.from_config(config, **options)


def white_box_conflict(path: str | None, config: dict[str, Any] | None) -> str | None:
    """Why a white box given both by path and by config is refused (None when one is given).

    A model comes from one source: with both, one of the two settings would be silently ignored.
    """
    if path and config is not None:
        return (
            f"model.model={path!r} and model.model_config are both set; give one (on top of a config that "
            "sets the other, add --model.model null or --model.model_config null)"
        )
    return None


def load_causal_lm(
    path: str | None, config: dict[str, Any] | None = None, *, seed: int = 0, dtype: str | None = None
) -> PreTrainedModel:
    """The white-box: ``from_pretrained(path)``, or a freshly initialised model from ``config``."""
    conflict = white_box_conflict(path, config)
    if conflict:
        raise ModelLoadError(conflict)
    if config is not None:
        return _init_from_config(AutoModelForCausalLM, build_config(config), seed, dtype)
    if not path:
        raise ModelLoadError(
            "no white-box model given: set model.model (a path or hub name) or model.model_config"
        )
    return _from_pretrained(AutoModelForCausalLM, path, "causal LM", dtype)


def load_reward_model(
    path: str | None, config: dict[str, Any] | None = None, *, seed: int = 0, dtype: str | None = None
) -> PreTrainedModel:
    """A sequence-classification reward model with one output (the reward)."""
    if path and config is not None:  # one of the two would be silently ignored
        raise ModelLoadError(
            f"a reward model's model={path!r} and config are both set; give one (add "
            "--model.reward_model.init_args.config null, or the same under model.judge)"
        )
    if config is not None:
        return _init_from_config(
            AutoModelForSequenceClassification, build_config(config, num_labels=1), seed, dtype
        )
    if not path:
        raise ModelLoadError("no reward model given: set its model (a path or hub name) or its config")
    return _from_pretrained(AutoModelForSequenceClassification, path, "reward model", dtype)


def _from_pretrained(auto_class: Any, path: str, what: str, dtype: str | None) -> PreTrainedModel:
    """``auto_class.from_pretrained`` of a path, hub name or ``builtin:`` name; failures as one line."""
    path = resolve_builtin(path)
    require_hub(path, what, LOCAL_COPY)
    try:
        return auto_class.from_pretrained(path, dtype=dtype or "auto")
    except (OSError, ValueError) as error:
        raise _explain(what, path, error) from error


def apply_lora(model: PreTrainedModel, settings: dict[str, Any]):
    """Wrap the white-box in LoRA adapters (``peft.LoraConfig(**settings)``): only the adapters train.

    For small GPUs: the frozen base needs no gradients or optimizer state. Needs the ``lora`` extra (peft).
    """
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as error:
        raise ModelLoadError("model.whitebox.lora needs peft: pip install 'cyclealign_pl[lora]'") from error
    options = {"task_type": "CAUSAL_LM", **settings}
    try:
        config = LoraConfig(**options)
    except (TypeError, ValueError) as error:
        raise ModelLoadError(f"invalid model.whitebox.lora settings {settings!r}: {error}") from error
    try:
        return get_peft_model(model, config)
    except (TypeError, ValueError) as error:  # e.g. target_modules that the model does not have
        raise ModelLoadError(
            f"cannot apply model.whitebox.lora {settings!r} to {type(model).__name__}: {error}"
        ) from error


def plain_model(model: torch.nn.Module) -> PreTrainedModel:
    """The model to ``save_pretrained`` for plain transformers: LoRA adapters merged into a copy, else as
    is."""
    if hasattr(model, "merge_and_unload"):  # peft: merge a copy, so the trained adapters stay in place
        import copy

        return copy.deepcopy(model).merge_and_unload()
    return model
