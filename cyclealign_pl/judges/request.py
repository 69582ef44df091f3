"""One HTTP attempt of a chat completion, and what its failure means: a kind, a reason, whether to retry."""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from cyclealign_pl.judges.http_client import (
    ResponseTooLarge,
    connection_problem,
    find_cause,
    retry_after_seconds,
)
from cyclealign_pl.judges.settings import ChatSettings

# What a failed call can be (``ChatReply.kind``); the judge counts them as judge/failures/<kind>.
CALL_FAILURE_KINDS = (
    "timeout",
    "connection",
    "rate_limit",
    "server_error",
    "http_error",
    "bad_response",
    "too_large",
)
# Configuration errors: never retried, they stop the judge.
REFUSED = {
    401: "the API key in {env} was refused",
    403: "access is denied to the key in {env}",
    404: "model {model!r} or the URL was not found (check model and base_url)",
}


@dataclass(frozen=True)
class ChatReply:
    """A call's result: the reply text and token usage, or ``text=None`` with a failure kind and reason."""

    text: str | None = None
    usage: tuple[int, int] = (0, 0)
    kind: str | None = None
    reason: str | None = field(default=None)


class Outcome(NamedTuple):
    """One HTTP attempt: the reply or failure, the HTTP status of a failure, the server's Retry-After."""

    reply: ChatReply
    status: int | None = None
    retry_after: float | None = None
    retryable: bool = False
    sent_at: float = 0.0  # time.monotonic() when the attempt was sent
    detail: str = ""  # the error message of an HTTP error
    usage_estimated: bool = False  # the server reported no usage: it was estimated from the text


async def send_request(
    client: Any,
    settings: ChatSettings,
    messages: list[dict[str, str]],
    url: str,
    tries: str,
    *,
    max_tokens: int | None,
    timeout: float,
    response_format: dict[str, Any] | None = None,
) -> Outcome:
    """Send one chat completion (no retry), bounded by ``timeout`` of wall clock; a failure is an Outcome."""
    import openai

    try:
        response = await asyncio.wait_for(
            client.chat.completions.create(
                model=settings.model,
                messages=messages,
                temperature=settings.temperature,
                max_tokens=max_tokens if max_tokens is not None else openai.omit,
                response_format=response_format if response_format is not None else openai.omit,
                timeout=timeout,
            ),
            timeout=timeout,
        )
        text, usage = _read(response)
    except (asyncio.TimeoutError, openai.APITimeoutError):
        reason = f"timeout: no reply from {url} within {timeout:g} s {tries}"
        return Outcome(ChatReply(kind="timeout", reason=reason), retryable=True)
    except ResponseTooLarge as err:
        return Outcome(ChatReply(kind="too_large", reason=f"too_large: {url}: {err}"))
    except openai.APIConnectionError as err:
        too_large = find_cause(err, ResponseTooLarge)
        if too_large is not None:  # raised in the transport: the client calls it a connection error
            return Outcome(ChatReply(kind="too_large", reason=f"too_large: {url}: {too_large}"))
        reason = f"connection: cannot reach {url}: {connection_problem(err, url)} {tries}"
        return Outcome(ChatReply(kind="connection", reason=reason), retryable=True)
    except openai.APIStatusError as err:
        return _status_failure(err, url, tries)
    except (openai.APIResponseValidationError, ValueError, KeyError, TypeError, AttributeError) as err:
        reason = (
            f"bad_response: {url} answered with something that is not a chat completion "
            f"({type(err).__name__})"
        )
        return Outcome(ChatReply(kind="bad_response", reason=reason))
    if usage is None:  # some local servers report no usage: estimate it, so budgets still hold
        usage = (math.ceil(sum(len(m["content"]) for m in messages) / 4), math.ceil(len(text) / 4))
        return Outcome(ChatReply(text=text, usage=usage), usage_estimated=True)
    return Outcome(ChatReply(text=text, usage=usage))


def _status_failure(err: Any, url: str, tries: str) -> Outcome:
    """An HTTP error status: its kind, whether to retry (``x-should-retry`` first), its Retry-After."""
    status, headers = err.status_code, err.response.headers
    should = headers.get("x-should-retry")
    if should in ("true", "false"):
        retryable = should == "true"
    else:
        retryable = status in (408, 409, 429) or status >= 500
    kind = "rate_limit" if status == 429 else "server_error" if status >= 500 else "http_error"
    reply = ChatReply(kind=kind, reason=f"{kind}: HTTP {status} from {url} {tries}")
    retry_after = retry_after_seconds(headers)
    detail = str(getattr(err, "message", "") or "")[:2000]
    return Outcome(reply, status, retry_after, retryable and status not in REFUSED, detail=detail)


def _read(response: Any) -> tuple[str, tuple[int, int] | None]:
    """The reply text and (prompt, completion) tokens of a chat completion; ValueError if not one."""
    if isinstance(response, (str, bytes)) or not getattr(response, "choices", None):
        raise ValueError("no choices")
    text = response.choices[0].message.content or ""
    usage = getattr(response, "usage", None)
    if usage is None:
        return text, None
    return text, (int(usage.prompt_tokens or 0), int(usage.completion_tokens or 0))


__all__ = ["CALL_FAILURE_KINDS", "REFUSED", "ChatReply", "Outcome", "send_request"]
