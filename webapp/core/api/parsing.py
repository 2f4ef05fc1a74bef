"""Reading request bodies: a stricter JSON parser and OpenAI's refusal of unknown fields."""

from __future__ import annotations

import re
from typing import Any

from rest_framework import exceptions, serializers
from rest_framework.parsers import JSONParser

MAX_JSON_DEPTH = 64
# NUL cannot be stored by PostgreSQL; a lone surrogate cannot be encoded as UTF-8 at all.
_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")


class StrictJSONParser(JSONParser):
    """DRF's JSON parser, refusing with a 400 what would otherwise surface as a 500 later:
    nesting deeper than MAX_JSON_DEPTH (json recurses per level), NUL characters and lone
    surrogates in any string or key."""

    def parse(self, stream: Any, media_type: str | None = None, parser_context: Any = None) -> Any:
        try:
            data = super().parse(stream, media_type, parser_context)
        except RecursionError:
            raise exceptions.ParseError(
                f"JSON parse error - nested deeper than {MAX_JSON_DEPTH} levels"
            ) from None
        _check_json(data)
        return data


def _check_json(data: Any) -> None:
    """Walk the parsed document without recursion."""
    stack = [(data, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, str):
            if _UNSTORABLE.search(value):
                raise exceptions.ParseError(
                    "JSON parse error - strings must not contain NUL characters or "
                    "unpaired surrogates"
                )
            continue
        if not isinstance(value, dict | list):
            continue
        if depth > MAX_JSON_DEPTH:
            raise exceptions.ParseError(
                f"JSON parse error - nested deeper than {MAX_JSON_DEPTH} levels"
            )
        items = [*value.keys(), *value.values()] if isinstance(value, dict) else value
        stack.extend((item, depth + 1) for item in items)


def refuse_unknown_fields(serializer: serializers.Serializer, data: Any) -> None:
    """Refuse a body naming a field the serializer does not know, as OpenAI does."""
    if isinstance(data, dict):
        for name in data:
            if name not in serializer.fields:
                raise serializers.ValidationError(
                    {name: [f"Unrecognized request argument supplied: {name}"]},
                    code="unknown",
                )
