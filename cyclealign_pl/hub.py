"""The Hugging Face hub, checked once before the first download: offline is one line in seconds, not a minute
of retries.

``from_pretrained`` and ``datasets.load_dataset`` retry an unreachable hub 5 times with backoff (36-72 s and
a dozen "Retrying in 8s" lines) before failing with a message that does not name the setting to change.
:func:`require_hub` sends one HEAD request to the endpoint (``HF_ENDPOINT``) with a short timeout before
anything is loaded by hub name, and when it fails raises :class:`HubUnreachable`: which model or dataset was
wanted, and what to do. With ``HF_HUB_OFFLINE=1`` nothing is checked: the libraries read their caches.
"""

from __future__ import annotations

import re
from pathlib import Path

PROBE_TIMEOUT_S = 3.0
_HUB_NAME = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")
_probed: dict[str, str | None] = {}  # endpoint -> None (reachable) or why not; once per process


class HubUnreachable(ConnectionError):
    """The hub cannot be reached and something must be loaded from it; the message says what to do."""


def is_hub_name(name: str) -> bool:
    """``org/name`` (or ``name``) that is not a local path: ``from_pretrained`` would go to the hub."""
    return (
        not Path(name).expanduser().exists()
        and not name.startswith(("/", ".", "~"))
        and bool(_HUB_NAME.fullmatch(name))
    )


def offline() -> bool:
    from huggingface_hub import constants

    check = getattr(constants, "is_offline_mode", None)
    return bool(check() if callable(check) else constants.HF_HUB_OFFLINE)


def endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


def probe(timeout: float = PROBE_TIMEOUT_S) -> str | None:
    """Why the hub cannot be reached (None: it answered, whatever the status), asked once per process."""
    url = endpoint()
    if url not in _probed:
        from huggingface_hub import get_session

        try:
            get_session().head(url, timeout=timeout)
            _probed[url] = None
        except Exception as error:  # the HTTP client's connect/timeout/proxy errors: no answer at all
            reason = str(error).strip() or type(error).__name__
            _probed[url] = reason.splitlines()[0]
    return _probed[url]


def require_hub(name: str | None, what: str, local: str) -> None:
    """Fail in one line if ``name`` must come from the hub and the hub does not answer.

    ``what`` says what was wanted (``"white-box model"``), ``local`` how to give a local copy instead
    (``"--model.model /path/to/model"``).
    """
    if not name or not is_hub_name(name) or offline():
        return
    reason = probe()
    if reason is None:
        return
    raise HubUnreachable(
        f"the Hugging Face hub ({endpoint()}) is unreachable ({reason}) and the {what} {name!r} comes from "
        f"it: give a local copy ({local}), or, if it was downloaded before, set HF_HUB_OFFLINE=1 to use the "
        "cache"
    )
