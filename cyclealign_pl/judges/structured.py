"""Structured output: ask for the reply as JSON following a schema, in the strongest form the server takes.

Servers differ in the ``response_format`` they accept; a refusal (HTTP 400/422, or an error naming
``response_format``) steps down to the next form at once, and the transport remembers it (docs/judges.md).
"""

from __future__ import annotations

import logging
from typing import Any

from cyclealign_pl.judges.counters import Counters

log = logging.getLogger(__name__)

# How a JSON schema is asked for, strongest first: OpenAI's structured outputs, llama.cpp's JSON mode with a
# schema (llama-cpp-python's server takes only this one), none (the reply's text is parsed).
STRUCTURED_OUTPUT_FORMS = ("json_schema", "json_object", "off")
_SCHEMA_REFUSED = (
    400,
    422,
)  # and any error status whose message names response_format (llama-cpp-python: 500)


def schema_refused(status: int | None, detail: str) -> bool:
    """Whether the server refused the request's ``response_format``: a 400/422, or an error naming it (a
    validation error that llama-cpp-python's server answers with HTTP 500)."""
    return status in _SCHEMA_REFUSED or (status is not None and "response_format" in detail)


def response_format(schema: dict[str, Any] | None, form: int) -> dict[str, Any] | None:
    """``response_format`` asking for JSON following ``schema`` in ``STRUCTURED_OUTPUT_FORMS[form]``."""
    what = STRUCTURED_OUTPUT_FORMS[form]
    if schema is None or what == "off":
        return None
    if what == "json_schema":
        return {"type": "json_schema", "json_schema": schema}
    return {"type": "json_object", "schema": schema["schema"]}


def first_form(schema: dict[str, Any] | None, structured_output: str) -> int:
    """The form a call asks in first: ``structured_output``, or "off" without a schema."""
    if schema is None:
        return len(STRUCTURED_OUTPUT_FORMS) - 1
    return STRUCTURED_OUTPUT_FORMS.index(structured_output)


class StructuredOutput:
    """The strongest form of structured output the server takes, learnt from its refusals (said once each)."""

    def __init__(self, counters: Counters, name: str) -> None:
        self.counters = counters
        self.name = name
        self.floor = 0  # index into STRUCTURED_OUTPUT_FORMS: the strongest form the server takes

    def form(self, first: int) -> int:
        """The form to ask in: ``first``, or weaker when the server refused it before."""
        return max(first, self.floor)

    def taken(self, form: int, url: str) -> None:
        """The server took ``form`` after refusing stronger ones: remember it; say so once per change."""
        if form <= self.floor:
            return
        refused = ", ".join(STRUCTURED_OUTPUT_FORMS[self.floor : form])
        self.floor = form
        self.counters.bump("structured_output_fallbacks")
        now = STRUCTURED_OUTPUT_FORMS[form]
        log.warning(
            "%s: the server at %s refused response_format %s; %s",
            self.name,
            url,
            refused,
            "asking without it: the reply's text is parsed"
            if now == "off"
            else f"using {now!r} with the schema (llama.cpp's form)",
        )


__all__ = ["STRUCTURED_OUTPUT_FORMS", "StructuredOutput", "first_form", "response_format", "schema_refused"]
