"""Request bodies: what the JSON parser refuses is a 400 (MalformedRequest) whatever the
reason, and what it lets through for validation to name (NaN, Infinity, numbers beyond
float range) reaches validation as floats."""

from __future__ import annotations

import math

import pytest

from serving.errors import MalformedRequest
from serving.transport.http import parse_json


@pytest.mark.parametrize(
    "body",
    [
        b"[" * 5000 + b"]" * 5000,  # past the stdlib parser's recursion limit too
        b'{"instances": ' + b"[" * 2000 + b"]" * 2000 + b"}",
        b'{"user_id": "\\ud800"}',  # a lone UTF-16 surrogate: no valid text
        b'["\\udc00x"]',
        b'{"instances": [1,',
        b"\xff\xfe",
    ],
)
def test_refused_bodies_are_malformed_requests(body: bytes) -> None:
    with pytest.raises(MalformedRequest, match="not valid JSON"):
        parse_json(body)


def test_numbers_for_validation_to_name() -> None:
    got = parse_json(b'{"a": [NaN, Infinity, 1' + b"0" * 400 + b", 12345678901234567890, 7]}")
    a = got["a"]
    assert math.isnan(a[0]) and a[1] == math.inf and a[2] == math.inf
    assert a[3] == pytest.approx(1.2345678901234567e19) and a[4] == 7


def test_paired_surrogates_are_text() -> None:
    assert parse_json(b'["\\ud83d\\ude00"]') == ["\U0001f600"]
