"""The HTTP side of a chat call: the openai client (key, headers, a capped body), URLs, what errors mean.

The openai client's own retries are off (``max_retries=0``): the transport retries, so that a server in
trouble pauses every request and each retry is counted (docs/judges.md).
"""

from __future__ import annotations

import email.utils
import ipaddress
import math
import os
import socket
import ssl
import time
from typing import Any
from urllib.parse import urlsplit

from cyclealign_pl.judges.base import JudgeUnavailable
from cyclealign_pl.judges.settings import ChatSettings

PLACEHOLDER_KEY = "sk-no-key-required"  # sent to loopback servers when api_key_env is unset
DEFAULT_BASE_URL = "https://api.openai.com/v1"


def open_client(settings: ChatSettings, name: str) -> tuple[Any, bool]:
    """The AsyncOpenAI client, and whether it sends the placeholder key; the API key is read now, kept by the
    client only. Raises :class:`JudgeUnavailable` for a missing key or a header's unset variable."""
    import httpx2
    import openai

    s = settings
    url = s.base_url or os.environ.get("OPENAI_BASE_URL") or DEFAULT_BASE_URL
    key = os.environ.get(s.api_key_env)
    placeholder = False
    if not key:
        if not is_loopback(url):
            raise JudgeUnavailable(
                f"{name}: the environment variable {s.api_key_env} is not set (or empty), and "
                f"the server at {display_url(url)} needs an API key. Set it, or set api_key_env to "
                "the variable that holds the key."
            )
        key, placeholder = PLACEHOLDER_KEY, True
    client = openai.AsyncOpenAI(
        api_key=key,
        base_url=s.base_url,
        max_retries=0,
        timeout=s.request_timeout,
        default_headers=_headers(settings, name) or None,
        http_client=openai.DefaultAsyncHttpxClient(
            timeout=httpx2.Timeout(s.request_timeout, connect=s.preflight_timeout),
            transport=_capped_transport(
                httpx2.AsyncHTTPTransport(
                    limits=httpx2.Limits(
                        max_connections=s.max_concurrency,
                        max_keepalive_connections=s.max_concurrency,
                    )
                ),
                s.max_response_bytes,
            ),
        ),
    )
    return client, placeholder


def _headers(settings: ChatSettings, name: str) -> dict[str, str]:
    """``extra_headers`` with each ``"env:NAME"`` value read from its environment variable."""
    out = {}
    for header, value in (settings.extra_headers or {}).items():
        if value.startswith("env:"):
            resolved = os.environ.get(value[4:])
            if not resolved:
                raise JudgeUnavailable(
                    f"{name}: header {header!r} reads the environment variable {value[4:]}, which is not set"
                )
            value = resolved
        out[header] = value
    return out


def is_loopback(url: str) -> bool:
    host = urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def display_url(url: str) -> str:
    """The URL without user:password, for messages."""
    parts = urlsplit(url)
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{parts.hostname or ''}{port}{parts.path.rstrip('/')}"


def connection_problem(error: BaseException, url: str) -> str:
    """What a connection error means, in words: the cause found in the exception chain."""
    seen = []
    cause: BaseException | None = error
    while cause is not None and len(seen) < 16:
        seen.append(cause)
        cause = cause.__cause__ or cause.__context__
    for err in seen:
        if isinstance(err, socket.gaierror):
            return f"the host name {urlsplit(url).hostname!r} does not resolve ({err.strerror or err})"
        if isinstance(err, ConnectionRefusedError):
            return "connection refused (is the server running, on this port?)"
        if isinstance(err, ssl.SSLError):
            return f"TLS error: {err}"
        if isinstance(err, ConnectionResetError):
            return "the connection was reset"
    last = seen[-1]
    text = " ".join(str(last).split()) or "no details"
    if type(last).__name__ == "RemoteProtocolError" or "without sending" in text:
        return f"the server closed the connection without a response ({text})"
    return f"{type(last).__name__}: {text}"


def retry_after_seconds(headers: Any) -> float | None:
    """Seconds the server asks us to wait: ``retry-after-ms``, ``Retry-After`` (seconds or HTTP date)."""
    if headers is None:
        return None
    for name, divisor in (("retry-after-ms", 1000.0), ("retry-after", 1.0)):
        value = headers.get(name)
        if value is None:
            continue
        try:
            seconds = float(value) / divisor
        except ValueError:
            continue
        if math.isfinite(seconds):
            return max(0.0, seconds)
    value = headers.get("retry-after")
    if value:
        try:
            date = email.utils.parsedate_tz(value)
            if date is not None:
                return max(0.0, float(email.utils.mktime_tz(date) - time.time()))
        except (TypeError, ValueError, OverflowError):
            return None
    return None


class ResponseTooLarge(Exception):
    """The server's response is longer than ``max_response_bytes``."""


def find_cause(err: BaseException, kind: type[BaseException]) -> BaseException | None:
    """``err`` or the first of its causes / contexts that is a ``kind``."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, kind):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


def _capped_transport(transport: Any, max_bytes: int) -> Any:
    """``transport`` whose responses raise :class:`ResponseTooLarge` past ``max_bytes`` of body: refused
    by their ``Content-Length`` before reading, or cut off while streaming, so a huge reply is never held."""
    import httpx2

    class CappedStream(httpx2.AsyncByteStream):
        def __init__(self, stream: Any) -> None:
            self._stream = stream

        async def __aiter__(self) -> Any:
            read = 0
            async for chunk in self._stream:
                read += len(chunk)
                if read > max_bytes:
                    raise ResponseTooLarge(f"the response is longer than max_response_bytes={max_bytes}")
                yield chunk

        async def aclose(self) -> None:
            await self._stream.aclose()

    class CappedTransport(httpx2.AsyncBaseTransport):
        async def handle_async_request(self, request: Any) -> Any:
            response = await transport.handle_async_request(request)
            length = response.headers.get("content-length", "")
            if length.isdigit() and int(length) > max_bytes:
                await response.aclose()
                raise ResponseTooLarge(
                    f"the response has {int(length)} bytes, more than max_response_bytes={max_bytes}"
                )
            response.stream = CappedStream(response.stream)
            return response

        async def aclose(self) -> None:
            await transport.aclose()

    return CappedTransport()


__all__ = [
    "DEFAULT_BASE_URL",
    "PLACEHOLDER_KEY",
    "ResponseTooLarge",
    "connection_problem",
    "display_url",
    "find_cause",
    "is_loopback",
    "open_client",
    "retry_after_seconds",
]
