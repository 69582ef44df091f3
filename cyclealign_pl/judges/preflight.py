"""The preflight: within seconds and before any work, a server that cannot serve the run is one line."""

from __future__ import annotations

import asyncio
import logging

from cyclealign_pl.judges.http_client import connection_problem
from cyclealign_pl.judges.request import REFUSED
from cyclealign_pl.judges.transport import ChatTransport

log = logging.getLogger(__name__)


async def preflight(transport: ChatTransport) -> None:
    """Raise :class:`~cyclealign_pl.judges.base.JudgeUnavailable` (one line) unless the server answers and
    serves the model.

    ``GET /models`` costs nothing; a server without that route (or whose list is unreadable) gets one chat
    completion of at most one token instead, recorded in the ledger like any request. Each request is bounded
    by ``min(request_timeout, 10 s)`` and never retried.
    """
    s, url, timeout = transport.settings, transport.url(), transport.settings.preflight_timeout
    served = await _served_models(transport, url, timeout)
    if served is not None and (s.model in served or f"{s.model}:latest" in served):
        return
    probe = [{"role": "user", "content": "Reply with OK."}]
    async with transport.limit.slot():
        outcome = await transport.attempt(probe, url, "(preflight)", max_tokens=1, timeout=timeout)
    reply = outcome.reply
    listed = (
        ""
        if served is None
        else f" (it serves: {', '.join(served[:10]) or 'no model'}" + (", ...)" if len(served) > 10 else ")")
    )
    if reply.text is not None:
        if served is not None:
            log.warning(
                "%s: model %r is not in the model list of %s, but it answers", transport.name, s.model, url
            )
        return
    if outcome.status == 404 and served is not None:
        transport.fail(f"model {s.model!r} is not served at {url}{listed}")
    if outcome.status in REFUSED:
        transport.fail(transport.refusal(outcome.status, url))
    if reply.kind == "timeout":
        transport.fail(f"no answer from {url} within {timeout:g} s")
    unlisted = served is not None and reply.kind == "http_error"  # a 4xx for a model it does not list
    if reply.kind in ("connection", "bad_response") or unlisted:
        transport.fail(f"{reply.reason}{listed}")
    log.warning(
        "%s: preflight request to %s failed (%s); going on, the run's retries decide",
        transport.name,
        url,
        reply.reason,
    )


async def _served_models(transport: ChatTransport, url: str, timeout: float) -> list[str] | None:
    """The models the server lists (``GET /models``); None when it has no readable list. A server that does
    not answer, or refuses the key, stops the transport."""
    import openai

    try:
        page = await asyncio.wait_for(transport.client().models.list(timeout=timeout), timeout + 1.0)
        return [str(model.id) for model in page.data]
    except (asyncio.TimeoutError, openai.APITimeoutError):
        transport.fail(f"no answer from {url} within {timeout:g} s")
    except openai.APIConnectionError as err:
        transport.fail(f"cannot reach {url}: {connection_problem(err, url)}")
    except openai.APIStatusError as err:
        if err.status_code in (401, 403):
            transport.fail(transport.refusal(err.status_code, url))
    except (openai.APIResponseValidationError, ValueError, TypeError, AttributeError, KeyError):
        pass  # not a model list: ask the chat route
    return None


__all__ = ["preflight"]
