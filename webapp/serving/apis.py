"""``POST /v1/chat/completions``: OpenAI's request and response shapes, streamed or not."""

from __future__ import annotations

import json
import secrets
import select
import socket
import time
from collections.abc import Iterator
from typing import Any

from django.http import HttpResponse, StreamingHttpResponse
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiResponse, extend_schema
from rest_framework import serializers
from rest_framework.request import Request
from rest_framework.response import Response

from customization.config import MAX_STOP_CHARS
from webapp.accounts.models import ApiKey
from webapp.core.api.errors import ErrorSerializer, error_body
from webapp.core.api.views import ApiView
from webapp.serving.services import ChatRequest, SubmittedChat, chat_completion_submit

ROLES = ("system", "developer", "user", "assistant")
# Generation also stops at the context window; this only bounds the number itself.
MAX_NEW_TOKENS = 1_000_000
# Accepted for compatibility and ignored: they change nothing about the answer.
IGNORED_FIELDS = ("user", "metadata", "store", "service_tier", "parallel_tool_calls")
UNSUPPORTED_FIELDS = (
    "tools",
    "tool_choice",
    "functions",
    "function_call",
    "logit_bias",
    "audio",
    "modalities",
    "prediction",
    "web_search_options",
    "reasoning_effort",
    "top_logprobs",
)


class MessageSerializer(serializers.Serializer):
    role = serializers.ChoiceField(choices=ROLES)
    content = serializers.JSONField(help_text="A string, or a list of text parts.")
    name = serializers.CharField(required=False, max_length=64)

    def validate_content(self, value: Any) -> str:
        if isinstance(value, str):
            return value
        if isinstance(value, list) and value:
            texts = []
            for part in value:
                if not (isinstance(part, dict) and part.get("type") == "text"):
                    raise serializers.ValidationError("only text content parts are supported")
                if not isinstance(part.get("text"), str):
                    raise serializers.ValidationError("a text part needs a 'text' string")
                texts.append(part["text"])
            return "".join(texts)
        raise serializers.ValidationError("content must be a string or a list of text parts")

    def to_internal_value(self, data: Any) -> Any:
        if isinstance(data, dict) and data.get("role") in ("tool", "function"):
            raise serializers.ValidationError(
                {"role": [f"role '{data['role']}' is not supported: this model has no tools"]}
            )
        return super().to_internal_value(data)


class StreamOptionsSerializer(serializers.Serializer):
    include_usage = serializers.BooleanField(required=False, default=False)


class ChatCompletionInputSerializer(serializers.Serializer):
    model = serializers.CharField(max_length=512)
    messages = MessageSerializer(many=True, allow_empty=False)
    temperature = serializers.FloatField(required=False, min_value=0.0, max_value=2.0, default=1.0)
    top_p = serializers.FloatField(required=False, min_value=0.0, max_value=1.0, default=1.0)
    max_tokens = serializers.IntegerField(
        required=False, allow_null=True, min_value=1, max_value=MAX_NEW_TOKENS
    )
    max_completion_tokens = serializers.IntegerField(
        required=False, allow_null=True, min_value=1, max_value=MAX_NEW_TOKENS
    )
    stop = serializers.JSONField(required=False, allow_null=True)
    seed = serializers.IntegerField(
        required=False, allow_null=True, min_value=-(2**63), max_value=2**63 - 1
    )
    n = serializers.IntegerField(required=False, min_value=1, max_value=8, default=1)
    stream = serializers.BooleanField(required=False, default=False)
    stream_options = StreamOptionsSerializer(required=False, allow_null=True)
    frequency_penalty = serializers.FloatField(
        required=False, min_value=-2.0, max_value=2.0, default=0.0
    )
    presence_penalty = serializers.FloatField(
        required=False, min_value=-2.0, max_value=2.0, default=0.0
    )
    logprobs = serializers.BooleanField(required=False, allow_null=True)
    response_format = serializers.JSONField(required=False, allow_null=True)
    user = serializers.CharField(required=False, max_length=256)
    metadata = serializers.DictField(child=serializers.CharField(), required=False)
    store = serializers.BooleanField(required=False, allow_null=True)

    def to_internal_value(self, data: Any) -> Any:
        if isinstance(data, dict):
            for name in data:
                if name in UNSUPPORTED_FIELDS and data[name] not in (None, [], {}):
                    raise serializers.ValidationError({name: ["is not supported by this server"]})
                if name not in self.fields and name not in UNSUPPORTED_FIELDS + IGNORED_FIELDS:
                    raise serializers.ValidationError(
                        {name: [f"Unrecognized request argument supplied: {name}"]},
                        code="unknown",
                    )
        return super().to_internal_value(data)

    def validate_stop(self, value: Any) -> list[str]:
        if value is None:
            return []
        stops = [value] if isinstance(value, str) else value
        if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
            raise serializers.ValidationError("stop must be a string or a list of strings")
        if len(stops) > 4:
            raise serializers.ValidationError("stop takes at most 4 sequences")
        if any(len(s) > MAX_STOP_CHARS for s in stops):
            raise serializers.ValidationError(
                f"each stop sequence may be at most {MAX_STOP_CHARS} characters"
            )
        return stops

    def validate_top_p(self, value: float) -> float:
        if value == 0.0:
            raise serializers.ValidationError("top_p must be greater than 0")
        return value

    def validate_logprobs(self, value: bool | None) -> bool | None:
        if value:
            raise serializers.ValidationError("logprobs are not supported by this server")
        return value

    def validate_response_format(self, value: Any) -> Any:
        if value not in (None, {"type": "text"}):
            raise serializers.ValidationError("only response_format {'type': 'text'} is supported")
        return value

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        if attrs.get("stream_options") and not attrs.get("stream"):
            raise serializers.ValidationError(
                {"stream_options": ["stream_options is only allowed when stream is true"]}
            )
        return attrs


# -- response shapes (for the schema) --------------------------------------------------------


class UsageSerializer(serializers.Serializer):
    prompt_tokens = serializers.IntegerField()
    completion_tokens = serializers.IntegerField()
    total_tokens = serializers.IntegerField()


class AssistantMessageSerializer(serializers.Serializer):
    role = serializers.ChoiceField(choices=["assistant"])
    content = serializers.CharField(allow_blank=True)
    refusal = serializers.CharField(allow_null=True)


class ChoiceSerializer(serializers.Serializer):
    index = serializers.IntegerField()
    message = AssistantMessageSerializer()
    finish_reason = serializers.ChoiceField(choices=["stop", "length"])
    logprobs = serializers.JSONField(allow_null=True)


class ChatCompletionSerializer(serializers.Serializer):
    id = serializers.CharField()
    object = serializers.CharField(help_text="Always 'chat.completion'.")
    created = serializers.IntegerField()
    model = serializers.CharField()
    system_fingerprint = serializers.CharField(allow_null=True)
    choices = ChoiceSerializer(many=True)
    usage = UsageSerializer()


# -- the view ---------------------------------------------------------------------------------


def _chunk(completion_id: str, created: int, model: str, choices: list[Any], **extra: Any) -> str:
    body = {
        "id": completion_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "system_fingerprint": None,
        "choices": choices,
        **extra,
    }
    return f"data: {json.dumps(body)}\n\n"


def _stream(submitted: SubmittedChat, completion_id: str, include_usage: bool) -> Iterator[str]:
    """SSE: a role chunk per choice, content deltas, a finish chunk, usage, then [DONE]."""
    completion = submitted.completion
    created, model = int(time.time()), submitted.model.name
    try:
        for index in range(completion.n):
            delta = {"role": "assistant", "content": ""}
            yield _chunk(completion_id, created, model, [_delta(index, delta, None)])
        for event in completion.events():
            if event.text:
                delta = {"content": event.text}
                yield _chunk(completion_id, created, model, [_delta(event.index, delta, None)])
            if event.finish_reason is not None:
                yield _chunk(
                    completion_id, created, model, [_delta(event.index, {}, event.finish_reason)]
                )
        if include_usage:
            yield _chunk(completion_id, created, model, [], usage=_usage(completion))
        yield "data: [DONE]\n\n"
    except Exception as exc:  # the status line is gone: report in-band, as OpenAI does
        message = getattr(exc, "message", None) or "The server had an error while streaming."
        error = error_body(message, type="server_error", code=getattr(exc, "code", None))
        yield f"data: {json.dumps(error)}\n\n"
    finally:
        completion.cancel()  # no-op when finished; frees the batch slot when the client left


def _delta(index: int, delta: dict[str, Any], finish_reason: str | None) -> dict[str, Any]:
    return {"index": index, "delta": delta, "finish_reason": finish_reason, "logprobs": None}


def _usage(completion: Any) -> dict[str, int]:
    completion_tokens = int(completion.completion_tokens)
    prompt_tokens = int(completion.prompt_tokens)
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


# How often a non-streamed completion checks that its client is still there.
_DISCONNECT_CHECK_SECONDS = 0.1


def _client_gone(connection: socket.socket) -> bool:
    """The peer closed the connection: readable, and a peek reads end-of-file."""
    try:
        readable, _, _ = select.select([connection], [], [], 0)
        if not readable:
            return False
        return connection.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False
    except (OSError, ValueError):  # reset by the peer, or already closed
        return True


def _collect_while_connected(
    completion: Any, connection: socket.socket | None
) -> list[tuple[str, str]] | None:
    """(text, finish_reason) per choice; None when the client left first, after cancelling,
    so its sequences leave the batch at the next step instead of decoding to the end.

    The connection is the client's socket, which gunicorn hands over as
    ``environ["gunicorn.socket"]``; without one (another server) it decodes to the end.
    """
    texts, reasons = [""] * completion.n, [""] * completion.n
    checked = time.monotonic() - _DISCONNECT_CHECK_SECONDS  # check at the first event
    for event in completion.events():
        texts[event.index] += event.text
        if event.finish_reason is not None:
            reasons[event.index] = event.finish_reason
        if connection is not None and time.monotonic() - checked >= _DISCONNECT_CHECK_SECONDS:
            checked = time.monotonic()
            if _client_gone(connection):
                completion.cancel()
                return None
    return list(zip(texts, reasons, strict=True))


class ChatCompletionCreateApi(ApiView):
    @extend_schema(
        operation_id="createChatCompletion",
        summary="Chat with a base model, a fine-tuned carry-on or one of its checkpoints",
        request=ChatCompletionInputSerializer,
        responses={
            (200, "application/json"): OpenApiResponse(
                ChatCompletionSerializer, description="A completion (stream=false)."
            ),
            (200, "text/event-stream"): OpenApiResponse(
                OpenApiTypes.STR,
                description="With stream=true: chat.completion.chunk objects as server-sent "
                "events, ending in 'data: [DONE]'.",
            ),
            **{status: ErrorSerializer for status in (400, 401, 404, 413, 429, 500, 503)},
        },
    )
    def post(self, request: Request) -> Response | StreamingHttpResponse | HttpResponse:
        serializer = ChatCompletionInputSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        data = serializer.validated_data
        chat = ChatRequest(
            model=data["model"],
            messages=[{"role": m["role"], "content": m["content"]} for m in data["messages"]],
            temperature=data["temperature"],
            top_p=data["top_p"],
            max_tokens=data.get("max_completion_tokens") or data.get("max_tokens"),
            stop=data.get("stop") or [],
            seed=data.get("seed"),
            n=data["n"],
            frequency_penalty=data["frequency_penalty"],
            presence_penalty=data["presence_penalty"],
        )
        api_key = request.auth if isinstance(request.auth, ApiKey) else None  # None: a session
        submitted = chat_completion_submit(user=request.user, request=chat, api_key=api_key)
        completion_id = f"chatcmpl-{secrets.token_urlsafe(18)}"
        if data["stream"]:
            include_usage = bool((data.get("stream_options") or {}).get("include_usage"))
            response = StreamingHttpResponse(
                _stream(submitted, completion_id, include_usage), content_type="text/event-stream"
            )
            response["cache-control"] = "no-cache"
            response["x-accel-buffering"] = "no"
            return response
        results = _collect_while_connected(
            submitted.completion, request.META.get("gunicorn.socket")
        )
        if results is None:  # nobody is left to answer; the engine has dropped the work
            return HttpResponse(status=499)
        return Response(
            {
                "id": completion_id,
                "object": "chat.completion",
                "created": int(time.time()),
                "model": submitted.model.name,
                "system_fingerprint": None,
                "choices": [
                    {
                        "index": index,
                        "message": {"role": "assistant", "content": text, "refusal": None},
                        "finish_reason": reason,
                        "logprobs": None,
                    }
                    for index, (text, reason) in enumerate(results)
                ],
                "usage": _usage(submitted.completion),
            }
        )
