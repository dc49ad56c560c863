"""Bad input to /v1/classify gets a clear 4xx, the API key is checked, long texts are flagged: no cluster."""

import asyncio
import json

import pytest
from fastapi import HTTPException
from fastapi.exceptions import RequestValidationError
from starlette.datastructures import Headers
from transformers import AutoTokenizer

from deployments.http import check_api_key, parse_classify, read_classify, truncated
from deployments.router import api, one_sentence_422
from dimee_models.train import resolve_backbone

LIMIT = 1_048_576  # the default
JSON = "application/json"


def rejected(body: bytes, content_type: str | None = JSON) -> tuple[int, str]:
    with pytest.raises(HTTPException) as exc:
        parse_classify(body, content_type, LIMIT)
    detail = exc.value.detail
    assert isinstance(detail, str) and detail and "\n" not in detail and detail.count(". ") == 0, detail
    return exc.value.status_code, detail


def doc(value) -> bytes:
    return json.dumps(value).encode()


@pytest.mark.parametrize("body,content_type,status,words", [
    (b'{"texts": ["a",]}', JSON, 400, ["not valid JSON", "line 1, column 16"]),
    (b'{"texts":\n ["a"', JSON, 400, ["not valid JSON", "line 2"]),
    (b"", JSON, 400, ["not valid JSON", "line 1, column 1"]),
    (b'{"texts": ["caf\xe9"]}', JSON, 400, ["not UTF-8", "offset 15"]),
    (b'{"texts": [' + b"[" * 100_000 + b"]" * 100_000 + b"]}", JSON, 400, ["not usable JSON", "recursion"]),
    (b'{"texts": [' + b"1" * 5000 + b"]}", JSON, 400, ["not usable JSON", "digits"]),
    (doc({"texts": ["a"]}), "text/plain", 415, ["application/json", "text/plain"]),
    (doc({"texts": ["a"]}), None, 415, ["application/json", "none"]),
    (doc({"texts": ["x" * LIMIT]}), JSON, 413, [f"{LIMIT + 15} bytes", f"limit of {LIMIT} bytes"]),
    (doc(["a", "b"]), JSON, 422, ["must be an object", "texts", "not an array"]),
    (doc("a"), JSON, 422, ["must be an object", "not a string"]),
    (doc({}), JSON, 422, ["texts: Field required"]),
    (doc({"text": ["a"]}), JSON, 422, ["texts: Field required"]),
    (doc({"texts": "a single string"}), JSON, 422, ["texts: Input should be a valid list"]),
    (doc({"texts": ["a", 3]}), JSON, 422, ["texts[1]: Input should be a valid string"]),
    (doc({"texts": []}), JSON, 422, ["texts: List should have at least 1 item"]),
    (doc({"texts": ["fine", "", "ok"]}), JSON, 422, ["texts[1] is empty"]),
    (doc({"texts": ["fine", "ok", " \t\n"]}), JSON, 422, ["texts[2] is empty"]),
    (b'{"texts": ["a\\ud800b"]}', JSON, 422, ["texts[0] holds a lone surrogate"]),
    (doc({"texts": ["a", "b"], "text_pairs": ["x"]}), JSON, 422, ["text_pairs has 1 items but texts has 2"]),
    (doc({"texts": ["a"], "text_pairs": "x"}), JSON, 422, ["text_pairs: Input should be a valid list"]),
    (doc({"texts": ["a"], "mode": "fastest"}), JSON, 422,
     ["mode: Input should be 'dimee', 'cloud_only', 'mobile_only' or 'edge_only'"]),
    (doc({"texts": ["a"], "policy": "fastest"}), JSON, 422, ["policy: Input should be 'dimee'"]),  # the old name
    (doc({"texts": ["a"], "colour": "red"}), JSON, 422, ["colour: Extra inputs are not permitted"]),
])
def test_each_bad_body_gets_its_status_and_one_sentence(body, content_type, status, words):
    got, detail = rejected(body, content_type)
    assert got == status, detail
    for word in words:
        assert word in detail, detail
    assert not detail.startswith("Value error")


@pytest.mark.parametrize("content_type", ["application/json", "application/json; charset=utf-8", "Application/JSON"])
def test_a_good_body_is_parsed(content_type):
    body = doc({"texts": ["a gorgeous movie.", "meh"], "mode": "cloud_only"})
    request = parse_classify(body, content_type, LIMIT)
    assert request.texts == ["a gorgeous movie.", "meh"] and request.mode == "cloud_only"
    assert parse_classify(b"\xef\xbb\xbf" + body, content_type, LIMIT).texts == request.texts  # byte order mark
    assert parse_classify(doc({"texts": ["x" * (LIMIT - 15)]}), content_type, LIMIT).texts[0].startswith("x")


def test_fastapis_own_422s_are_one_sentence_too():
    exc = RequestValidationError([{"loc": ("body", "texts", 0), "msg": "Input should be a valid string",
                                   "type": "string_type"}])
    response = asyncio.run(one_sentence_422(None, exc))
    assert response.status_code == 422
    assert json.loads(response.body) == {"detail": "texts[0]: Input should be a valid string"}


def test_the_docs_still_show_the_classify_body():
    post = api.openapi()["paths"]["/v1/classify"]["post"]
    schema = post["requestBody"]["content"]["application/json"]["schema"]
    assert post["requestBody"]["required"] and schema["required"] == ["texts"]
    assert set(schema["properties"]) == {"texts", "text_pairs", "mode"}
    assert "ClassifyResponse" in post["responses"]["200"]["content"]["application/json"]["schema"]["$ref"]


@pytest.mark.parametrize("key,headers", [
    (None, {}), (None, {"X-API-Key": "anything"}),  # no key configured: everyone is let in
    ("s3cret", {"X-API-Key": "s3cret"}), ("s3crét", {"X-API-Key": "s3crét"}),
])
def test_the_right_key_or_no_configured_key_lets_a_request_in(key, headers):
    assert check_api_key(key, Headers(headers)) is None


@pytest.mark.parametrize("headers,message", [
    ({}, "needs an API key: send it in the X-API-Key header"),
    ({"X-API-Key": ""}, "needs an API key"),
    ({"X-API-Key": "wrong"}, "does not hold this server's API key"),
    ({"X-API-Key": "s3cret "}, "does not hold"),
    ({"X-API-Key": "s3crét"}, "does not hold"),  # non-ASCII: no TypeError from compare_digest
    ({"Authorization": "Bearer s3cret"}, "needs an API key"),
])
def test_a_missing_or_wrong_api_key_gets_401(headers, message):
    with pytest.raises(HTTPException) as exc:
        check_api_key("s3cret", Headers(headers))
    assert exc.value.status_code == 401 and message in exc.value.detail


def test_the_right_api_key_passes_in_any_header_case():
    check_api_key("s3cret", Headers({"X-API-Key": "s3cret"}))
    check_api_key("s3cret", Headers({"x-api-key": "s3cret"}))


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(resolve_backbone("default"))


@pytest.mark.parametrize("pairs", [None, ["a", "x " * 40, "b"]])
def test_only_texts_longer_than_max_length_are_flagged_truncated(tokenizer, pairs):
    texts = ["short", "word " * 5000, "exactly this long"]
    max_length = len(tokenizer(texts[2], pairs[2] if pairs else None)["input_ids"])  # row 2 fits exactly
    ids = tokenizer(texts, pairs, truncation=True, max_length=max_length)["input_ids"]
    assert [len(row) for row in ids][1:] == [max_length, max_length]
    assert truncated(tokenizer, texts, pairs, ids, max_length) == [False, True, False]


def test_a_long_pair_alone_is_flagged_truncated(tokenizer):
    texts, pairs = ["short", "short"], ["short", "pair " * 100]
    ids = tokenizer(texts, pairs, truncation=True, max_length=16)["input_ids"]
    assert truncated(tokenizer, texts, pairs, ids, 16) == [False, True]


def read(tokenizer, body: bytes, headers: dict[str, str] | None = None, text_pair: bool = False, max_length: int = 16):
    """read_classify on a request as the ingress gets it; a body read after a refusing header fails the test."""
    from starlette.requests import Request

    headers = {"content-type": JSON, "content-length": str(len(body)), **(headers or {})}

    async def receive() -> dict:
        assert int(headers["content-length"]) <= LIMIT, "the body was read although its length is over the limit"
        return {"type": "http.request", "body": body, "more_body": False}

    scope = {"type": "http", "method": "POST", "path": "/v1/classify",
             "headers": [(k.encode(), v.encode()) for k, v in headers.items()]}
    return asyncio.run(read_classify(Request(scope, receive), tokenizer, max_body_bytes=LIMIT, max_texts=3,
                                     max_length=max_length, text_pair=text_pair))


@pytest.mark.parametrize("body,headers,text_pair,status,message", [
    (doc({"texts": ["a"]}), {"content-length": str(LIMIT + 1)}, False, 413,
     f"the body is {LIMIT + 1} bytes, over the limit of {LIMIT} bytes"),
    (doc({"texts": ["a"]}), {"content-type": "text/plain"}, False, 415,
     "Content-Type must be application/json, not text/plain"),
    (doc({"texts": ["a", "b", "c", "d"]}), {}, False, 422, "too many texts: 4 > the limit of 3"),
    (doc({"texts": ["a"], "text_pairs": ["b"]}), {}, False, 422,
     "text_pairs was sent but this model classifies single texts"),
    (doc({"texts": ["a"]}), {}, True, 422, "this model classifies sentence pairs: send text_pairs, one per text"),
])
def test_a_body_the_server_or_model_cannot_take_is_refused(tokenizer, body, headers, text_pair, status, message):
    with pytest.raises(HTTPException) as exc:
        read(tokenizer, body, headers, text_pair)
    assert exc.value.status_code == status and exc.value.detail == message


@pytest.mark.parametrize("pairs", [None, ["x", "y"]])
def test_a_good_body_is_read_tokenized_and_flagged_truncated(tokenizer, pairs):
    texts = ["short", "word " * 100]
    body, tokens, cut = read(tokenizer, doc({"texts": texts, "text_pairs": pairs, "mode": "edge_only"}),
                             text_pair=pairs is not None)
    assert body.texts == texts and body.text_pairs == pairs and body.mode == "edge_only"
    enc = tokenizer(texts, pairs, truncation=True, max_length=16)
    assert tokens.input_ids == enc["input_ids"] and tokens.token_type_ids == enc.get("token_type_ids")
    assert cut == [False, True]
