"""Request input without Ray: the classify body parsed by hand into one-sentence 4xx errors, the
optional API key, and which texts the tokenizer truncated."""

from __future__ import annotations

import hmac
import json
from collections.abc import Mapping

from fastapi import HTTPException
from pydantic import ValidationError

from deployments.schemas import ClassifyRequest

API_KEY_HEADER = "X-API-Key"
JSON_TYPES = {list: "an array", str: "a string", bool: "a boolean", int: "a number", float: "a number",
              type(None): "null"}


def parse_classify(body: bytes, content_type: str | None, max_body_bytes: int) -> ClassifyRequest:
    if (content_type or "").split(";")[0].strip().lower() != "application/json":
        got = f"not {content_type}" if content_type else "and this request has none"
        raise HTTPException(415, f"Content-Type must be application/json, {got}")
    if len(body) > max_body_bytes:
        raise HTTPException(413, f"the body is {len(body)} bytes, over the limit of {max_body_bytes} bytes")
    try:
        text = body.decode("utf-8-sig")  # RFC 8259 lets a parser skip a byte order mark
    except UnicodeDecodeError as err:
        raise HTTPException(400, f"the body is not UTF-8: invalid byte at offset {err.start}") from None
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as err:
        where = f"line {err.lineno}, column {err.colno}"
        raise HTTPException(400, f"the body is not valid JSON: {err.msg} at {where}") from None
    except (ValueError, RecursionError) as err:  # an integer of over 4300 digits; nesting deeper than ~1000
        raise HTTPException(400, f"the body is not usable JSON: {err}") from None
    if not isinstance(doc, dict):
        raise HTTPException(422, f"the JSON body must be an object with a texts field, not {JSON_TYPES[type(doc)]}")
    try:
        return ClassifyRequest.model_validate(doc)
    except ValidationError as err:
        raise HTTPException(422, validation_detail(err.errors())) from None


def validation_detail(errors: list[dict]) -> str:
    """Pydantic's first error as one sentence naming the field, e.g. "texts[2]: Input should be a
    valid string". FastAPI's own errors start their location with "body", "query", ...: "body" is dropped."""
    error = errors[0]
    loc = list(error["loc"])
    if loc[:1] == ["body"]:
        loc = loc[1:]
    where = ""
    for part in loc:
        where += f"[{part}]" if isinstance(part, int) else f".{part}" if where else str(part)
    message = error["msg"].removeprefix("Value error, ")
    return f"{where}: {message}" if where else message


def check_api_key(expected: str | None, headers: Mapping[str, str]) -> None:
    if expected is None:
        return
    given = headers.get(API_KEY_HEADER)
    if not given:
        raise HTTPException(401, f"this server needs an API key: send it in the {API_KEY_HEADER} header")
    # bytes, since compare_digest refuses non-ASCII str; constant time, so the key can't be guessed by timing
    if not hmac.compare_digest(given.encode(), expected.encode()):
        raise HTTPException(401, f"the {API_KEY_HEADER} header does not hold this server's API key")


def truncated(tokenizer, texts: list[str], pairs: list[str] | None, input_ids: list[list[int]],
              max_length: int) -> list[bool]:
    """Which rows were cut to max_length. Only rows of exactly that length can have been, so only
    those are tokenized again, without truncation."""
    return [
        len(ids) == max_length
        and len(tokenizer(texts[i], pairs[i] if pairs else None, verbose=False)["input_ids"]) > max_length
        for i, ids in enumerate(input_ids)
    ]
