"""Request input without Ray: the classify body parsed by hand into one-sentence 4xx errors and
tokenized, with which texts the tokenizer truncated; the optional API key."""

from __future__ import annotations

import hmac
import json
from collections.abc import Mapping

from fastapi import HTTPException, Request
from pydantic import ValidationError

from deployments.schemas import ClassifyRequest, Tokens

API_KEY_HEADER = "X-API-Key"
JSON_TYPES = {list: "an array", str: "a string", bool: "a boolean", int: "a number", float: "a number",
              type(None): "null"}


async def read_classify(request: Request, tokenizer, *, max_body_bytes: int, max_texts: int, max_length: int,
                        text_pair: bool) -> tuple[ClassifyRequest, Tokens, list[bool]]:
    """The classify body, checked against the server's limits and the model, and tokenized: the
    body, its token ids, and which texts were cut to max_length."""
    if int(request.headers.get("content-length") or 0) > max_body_bytes:  # refuse before reading it
        raise HTTPException(413, f"the body is {request.headers['content-length']} bytes, over the limit of "
                                 f"{max_body_bytes} bytes")
    body = parse_classify(await request.body(), request.headers.get("content-type"), max_body_bytes)
    if len(body.texts) > max_texts:
        raise HTTPException(422, f"too many texts: {len(body.texts)} > the limit of {max_texts}")
    if body.text_pairs is not None and not text_pair:
        raise HTTPException(422, "text_pairs was sent but this model classifies single texts")
    if body.text_pairs is None and text_pair:
        raise HTTPException(422, "this model classifies sentence pairs: send text_pairs, one per text")
    enc = tokenizer(body.texts, body.text_pairs, truncation=True, max_length=max_length)
    cut = truncated(tokenizer, body.texts, body.text_pairs, enc["input_ids"], max_length)
    return body, Tokens(enc["input_ids"], enc.get("token_type_ids")), cut


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
