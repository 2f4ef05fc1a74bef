"""A corpus of hostile and malformed requests: each is a clear 4xx and leaves nothing behind.

Every case names its request (endpoint, method, body, upload bytes or headers), the status
and OpenAI error ``code`` it must get (and the ``param`` or a message fragment where that
is what makes the answer clear), and the test checks that no record and no stored file was
created by it: nothing half-created, whatever the input.
"""

from __future__ import annotations

import gzip
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile

from tests.factories import FileFactory, FineTuningJobFactory, UserFactory
from tests.helpers.carry_on_kit import toy_jsonl
from webapp.customizations.models import (
    Adapter,
    Checkpoint,
    FeatureSet,
    File,
    FineTuningJob,
    JobEvent,
)

pytestmark = pytest.mark.django_db

UNSET: Any = object()
CHAT = "/v1/chat/completions"
JOBS = "/v1/fine_tuning/jobs"
HELLO = [{"role": "user", "content": "hi"}]
GOOD_ROW = {"prompt": "What is 2+2?", "completion": "4"}
BAD_DATASET = ("invalid_training_file", "file")


def _jsonl(*rows: Any) -> bytes:
    return "".join(json.dumps(row) + "\n" for row in rows).encode()


def _nested(depth: int, opener: str = "[", closer: str = "]") -> str:
    return opener * depth + closer * depth


@dataclass(frozen=True)
class Case:
    """One hostile request and the answer it must get."""

    id: str
    status: int
    code: str | None
    param: str | None = UNSET  # UNSET: not checked
    message: str = ""  # a fragment the message must contain
    method: str = "post"
    path: str = "/v1/files"
    upload: bytes | None = None  # multipart dataset upload (purpose fine-tune)
    filename: str = "train.jsonl"
    form: dict[str, Any] | None = None  # multipart fields instead of the default upload
    json: Any = UNSET  # a JSON body (merged onto ``base`` for dict bodies)
    base: dict[str, Any] = field(default_factory=dict)
    raw: bytes | None = None  # a raw body with ``content_type``
    content_type: str = "application/json"
    headers: dict[str, str] = field(default_factory=dict)
    carry_on: dict[str, Any] = field(default_factory=dict)  # settings.CARRY_ON overrides
    settings: dict[str, Any] = field(default_factory=dict)  # other settings overrides


def dataset(id: str, data: bytes, message: str, **kwargs: Any) -> Case:
    code, param = BAD_DATASET
    return Case(id, 400, code, param, message, upload=data, **kwargs)


def job(id: str, body: dict[str, Any], param: str | None, code: str = "invalid_value") -> Case:
    return Case(id, 400, code, param, path=JOBS, json=body, base=JOB_BODY)


def chat(id: str, body: Any, param: str | None, code: str = "invalid_value", **kw: Any) -> Case:
    return Case(id, kw.pop("status", 400), code, param, path=CHAT, json=body, base=CHAT_BODY, **kw)


JOB_BODY = {"model": "lively", "training_file": "{file}"}
CHAT_BODY = {"model": "lively", "messages": HELLO, "max_tokens": 2}

CASES = [
    # -- broken datasets (POST /v1/files): a 400 naming the problem, nothing stored ------------
    dataset("binary-random", bytes(range(256)) * 8, "NUL bytes"),
    dataset("binary-png", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + b"\x00" * 64, "NUL bytes"),
    dataset("gzip-jsonl", gzip.compress(_jsonl(GOOD_ROW) * 20), "line 1"),
    dataset("utf16-bom", _jsonl(GOOD_ROW).decode().encode("utf-16"), "UTF-16"),
    dataset("utf16-no-bom", _jsonl(GOOD_ROW).decode().encode("utf-16-le"), "NUL bytes"),
    dataset("invalid-utf8", b'{"prompt": "caf\xc3(", "completion": "x"}\n', "invalid UTF-8"),
    dataset("latin1", '{"prompt": "café", "completion": "x"}\n'.encode("latin-1"), "UTF-8"),
    dataset("nul-byte-in-line", b'{"prompt": "a\x00b", "completion": "c"}\n', "NUL bytes"),
    dataset("huge-single-line", b'{"prompt": "' + b"a" * (1_100_000) + b'"}\n', "limit"),
    dataset("deep-array-nesting", _nested(10_000).encode() + b"\n", "nested deeper"),
    dataset("deep-object-nesting", ('{"a":' * 10_000 + "1" + "}" * 10_000).encode(), "nested"),
    dataset("json-array-lines", b"[1, 2, 3]\n[4]\n", "expected a JSON object, got an array"),
    dataset("json-number-lines", b"42\n3.14\n", "got a number"),
    dataset("json-string-lines", b'"hello"\n"world"\n', "got a string"),
    dataset("json-null-and-bools", b"null\ntrue\nfalse\n", "got null"),
    dataset("not-json", b"question: what?\nanswer: 4\n", "invalid JSON"),
    dataset("truncated-json", b'{"prompt": "a", "completion": "b\n', "invalid JSON"),
    dataset("trailing-garbage", b'{"prompt": "a", "completion": "b"} extra\n', "invalid JSON"),
    dataset("duplicate-keys", b'{"prompt": "a", "prompt": "b", "completion": "c"}\n', "duplicate"),
    dataset("nan-constant", b'{"prompt": "a", "completion": "b", "metadata": NaN}\n', "NaN"),
    dataset("missing-answer", _jsonl({"question": "q?"}), 'missing "answer"'),
    dataset("no-assistant-turn", _jsonl({"messages": HELLO}), "no assistant message"),
    dataset("messages-not-a-list", _jsonl({"messages": "hello"}), "must be an array"),
    dataset("content-wrong-type", _jsonl({"prompt": 1, "completion": ["x"]}), "must be a string"),
    dataset(
        "unknown-role",
        _jsonl(
            {"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]}
        ),
        "unsupported role",
    ),
    dataset(
        "tool-role",
        _jsonl(
            {"messages": [{"role": "tool", "content": "x"}, {"role": "assistant", "content": "y"}]}
        ),
        "unsupported role",
    ),
    dataset("unknown-keys", _jsonl({**GOOD_ROW, "label": 1}), "unknown key"),
    dataset("mixed-formats", _jsonl(GOOD_ROW, {"question": "q", "answer": "a"}), "one format"),
    dataset("control-char-escaped", _jsonl({"prompt": "ring \u0007", "completion": "x"}), "U+0007"),
    dataset("control-char-raw", b'{"prompt": "a\x01", "completion": "b"}\n', "invalid JSON"),
    dataset("lone-surrogate", b'{"prompt": "\\ud800", "completion": "b"}\n', "surrogate"),
    dataset("empty-file", b"", "the file is empty"),
    dataset("only-blank-lines", b"\n\n   \n\t\n\r\n", "the file is empty"),
    dataset("bom-only", b"\xef\xbb\xbf", "the file is empty"),
    dataset("empty-strings", _jsonl({"prompt": " ", "completion": ""}), "is empty"),
    dataset("too-many-lines", b"\n" * 200_001, "more than the limit"),
    dataset(
        "over-long-example-chars", _jsonl({"prompt": "a" * 70_000, "completion": "b"}), "characters"
    ),
    dataset(
        "over-long-example-tokens",
        _jsonl({"prompt": "word " * 200, "completion": "b"}),
        "tokens long",
        carry_on={"MAX_EXAMPLE_TOKENS": 64},
    ),
    dataset(
        "all-weights-zero",
        _jsonl({"messages": [*HELLO, {"role": "assistant", "content": "x", "weight": 0}]}),
        "weight 0",
    ),
    # -- the upload request itself ---------------------------------------------------------
    Case(
        "upload-too-large",
        413,
        "file_too_large",
        "file",
        upload=toy_jsonl(40),
        settings={"CARRY_ON_MAX_UPLOAD_BYTES": 1000},
    ),
    Case(
        "upload-lying-content-length",
        413,
        "request_too_large",
        upload=toy_jsonl(2),
        headers={"CONTENT_LENGTH": str(10**12)},
    ),
    Case(
        "upload-missing-file",
        400,
        "missing_required_parameter",
        "file",
        form={"purpose": "fine-tune"},
    ),
    Case(
        "upload-file-as-text-field",
        400,
        "invalid_value",
        "file",
        form={"purpose": "fine-tune", "file": "not a file"},
    ),
    Case(
        "upload-unknown-purpose",
        400,
        "invalid_value",
        "purpose",
        form={"purpose": "assistants", "file": "@"},
    ),
    Case(
        "upload-as-json", 415, "unsupported_media_type", json={"file": "x", "purpose": "fine-tune"}
    ),
    Case(
        "upload-broken-multipart",
        400,
        "invalid_request_body",
        raw=b'--xx\r\nContent-Disposition: form-data; name="file"\r\n\r\nabc',
        content_type="multipart/form-data",
    ),
    Case(
        "upload-too-many-fields",
        400,
        "invalid_request_body",
        form={"purpose": "fine-tune", "file": "@", **{f"f{i}": "x" for i in range(1100)}},
    ),
    # -- fine-tuning jobs --------------------------------------------------------------------
    Case("job-malformed-json", 400, "invalid_request_body", path=JOBS, raw=b'{"model": '),
    Case("job-invalid-utf8-body", 400, "invalid_request_body", path=JOBS, raw=b'{"model": "\xff"}'),
    Case("job-body-is-a-list", 400, "invalid_value", None, path=JOBS, json=[JOB_BODY]),
    Case(
        "job-wrong-content-type",
        415,
        "unsupported_media_type",
        path=JOBS,
        raw=b"model=lively",
        content_type="text/plain",
    ),
    Case(
        "job-deeply-nested-json",
        400,
        "invalid_request_body",
        path=JOBS,
        raw=('{"metadata": ' + _nested(10_000) + "}").encode(),
    ),
    Case(
        "job-moderately-nested-json",
        400,
        "invalid_request_body",
        path=JOBS,
        raw=('{"model": "lively", "metadata": ' + _nested(200) + "}").encode(),
    ),
    Case(
        "job-nul-in-metadata",
        400,
        "invalid_request_body",
        path=JOBS,
        json={"metadata": {"k": "a\u0000b"}},
        base=JOB_BODY,
    ),
    Case(
        "job-lone-surrogate",
        400,
        "invalid_request_body",
        path=JOBS,
        raw=b'{"model": "lively", "training_file": "x", "suffix": "\\udc80"}',
    ),
    job(
        "job-missing-model-and-file",
        {"model": UNSET, "training_file": UNSET},
        "model",
        code="missing_required_parameter",
    ),
    job("job-unknown-field", {"learning_rate": 0.1}, "learning_rate", code="unknown_parameter"),
    Case(
        "job-unknown-model",
        400,
        "model_not_available",
        "model",
        path=JOBS,
        json={"model": "gpt-9"},
        base=JOB_BODY,
    ),
    Case(
        "job-foreign-training-file",
        400,
        "invalid_file",
        "training_file",
        path=JOBS,
        json={"training_file": "{foreign_file}"},
        base=JOB_BODY,
    ),
    Case(
        "job-missing-training-file",
        400,
        "invalid_file",
        "training_file",
        path=JOBS,
        json={"training_file": "file-" + "x" * 24},
        base=JOB_BODY,
    ),
    job("job-epochs-zero", {"hyperparameters": {"n_epochs": 0}}, "hyperparameters.n_epochs"),
    job("job-epochs-huge", {"hyperparameters": {"n_epochs": 10**9}}, "hyperparameters.n_epochs"),
    Case(
        "job-epochs-overflow",
        400,
        "invalid_value",
        "hyperparameters",
        path=JOBS,
        raw=b'{"model": "lively", "training_file": "{file}", "hyperparameters": {"n_epochs": 1e400}'
        b"}",
    ),
    Case(
        "job-epochs-infinity",
        400,
        "invalid_request_body",
        path=JOBS,
        raw=b'{"model": "lively", "training_file": "{file}", '
        b'"hyperparameters": {"n_epochs": Infinity}}',
    ),
    job("job-epochs-fraction", {"hyperparameters": {"n_epochs": 2.5}}, "hyperparameters.n_epochs"),
    job(
        "job-batch-negative", {"hyperparameters": {"batch_size": -1}}, "hyperparameters.batch_size"
    ),
    job(
        "job-lr-string",
        {"hyperparameters": {"learning_rate_multiplier": "fast"}},
        "hyperparameters.learning_rate_multiplier",
    ),
    job(
        "job-lr-bool",
        {"hyperparameters": {"learning_rate_multiplier": True}},
        "hyperparameters.learning_rate_multiplier",
    ),
    job("job-hyperparameters-list", {"hyperparameters": [1, 2]}, "hyperparameters"),
    job(
        "job-unknown-hyperparameter",
        {"hyperparameters": {"momentum": 0.9}},
        "hyperparameters.momentum",
    ),
    job("job-method-dpo", {"method": {"type": "dpo"}}, "method"),
    job(
        "job-carry-on-huge",
        {"carry_on": {"d_model": 8192, "n_blocks": 64, "n_heads": 64}},
        "carry_on",
        code="carry_on_too_large",
    ),
    job("job-carry-on-float-width", {"carry_on": {"d_model": 64.5}}, "carry_on.d_model"),
    job("job-carry-on-taps-strings", {"carry_on": {"taps": ["last"]}}, "carry_on.taps"),
    job("job-carry-on-unknown", {"carry_on": {"wings": 2}}, "carry_on.wings"),
    job("job-carry-on-dropout", {"carry_on": {"dropout": 5}}, "carry_on"),
    job("job-suffix-traversal", {"suffix": "../../etc"}, "suffix"),
    job("job-suffix-too-long", {"suffix": "s" * 65}, "suffix"),
    job("job-seed-negative", {"seed": -1}, "seed"),
    job("job-seed-huge", {"seed": 2**70}, "seed"),
    job("job-metadata-nested", {"metadata": {"k": {"nested": 1}}}, "metadata"),
    job("job-metadata-too-many", {"metadata": {f"k{i}": "v" for i in range(17)}}, "metadata"),
    job("job-integrations", {"integrations": [{"type": "wandb"}]}, "integrations"),
    # -- chat completions ------------------------------------------------------------------
    chat("chat-unknown-model", {"model": "gpt-9"}, "model", code="not_found", status=404),
    chat(
        "chat-foreign-adapter",
        {"model": "{foreign_adapter}"},
        "model",
        code="not_found",
        status=404,
    ),
    chat("chat-messages-empty", {"messages": []}, "messages"),
    chat("chat-messages-not-a-list", {"messages": "hi"}, "messages"),
    chat("chat-message-not-an-object", {"messages": ["hi"]}, "messages[0]"),
    chat(
        "chat-unknown-role", {"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"
    ),
    chat("chat-tool-role", {"messages": [{"role": "tool", "content": "x"}]}, "messages[0].role"),
    chat(
        "chat-content-number", {"messages": [{"role": "user", "content": 5}]}, "messages[0].content"
    ),
    chat(
        "chat-image-part",
        {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
        "messages[0].content",
    ),
    chat("chat-max-tokens-zero", {"max_tokens": 0}, "max_tokens"),
    chat("chat-max-tokens-negative", {"max_tokens": -5}, "max_tokens"),
    chat("chat-max-tokens-huge", {"max_tokens": 10**12}, "max_tokens"),
    chat(
        "chat-max-completion-tokens-huge", {"max_completion_tokens": 10**7}, "max_completion_tokens"
    ),
    chat("chat-n-zero", {"n": 0}, "n"),
    chat("chat-n-huge", {"n": 10**6}, "n"),
    chat("chat-stop-too-many", {"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    chat("chat-stop-not-strings", {"stop": [1, None]}, "stop"),
    chat("chat-stop-empty-string", {"stop": [""]}, "stop"),
    chat("chat-temperature-negative", {"temperature": -1}, "temperature"),
    chat("chat-temperature-string", {"temperature": "hot"}, "temperature"),
    chat("chat-top-p-zero", {"top_p": 0}, "top_p"),
    chat("chat-seed-out-of-range", {"seed": 2**64}, "seed"),
    chat("chat-stream-not-bool", {"stream": 5}, "stream"),
    chat(
        "chat-stream-options-without-stream",
        {"stream_options": {"include_usage": True}},
        "stream_options",
    ),
    chat("chat-unsupported-tools", {"tools": [{"type": "function"}]}, "tools"),
    chat("chat-unknown-field", {"frobnicate": 1}, "frobnicate", code="unknown_parameter"),
    chat(
        "chat-name-too-long",
        {"messages": [{"role": "user", "content": "x", "name": "n" * 65}]},
        "messages[0].name",
    ),
    chat(
        "chat-prompt-over-context",
        {"messages": [{"role": "user", "content": "word " * 400}]},
        "messages",
        code="context_length_exceeded",
    ),
    chat(
        "chat-nul-in-content",
        {"messages": [{"role": "user", "content": "a\u0000"}]},
        None,
        code="invalid_request_body",
    ),
    Case(
        "chat-oversized-body",
        413,
        "request_too_large",
        path=CHAT,
        json={"messages": [{"role": "user", "content": "a" * 3_000_000}]},
        base=CHAT_BODY,
    ),
    Case(
        "chat-form-encoded",
        415,
        "unsupported_media_type",
        path=CHAT,
        raw=b"model=lively&messages=hi",
        content_type="application/x-www-form-urlencoded",
    ),
    Case("chat-empty-body", 400, "missing_required_parameter", "model", path=CHAT, raw=b"{}"),
    # -- ids, pagination and URLs --------------------------------------------------------------
    Case("list-limit-zero", 400, "invalid_value", "limit", method="get", path="/v1/files?limit=0"),
    Case(
        "list-limit-huge",
        400,
        "invalid_value",
        "limit",
        method="get",
        path="/v1/fine_tuning/jobs?limit=1000000000",
    ),
    Case(
        "list-limit-text", 400, "invalid_value", "limit", method="get", path="/v1/files?limit=ten"
    ),
    Case(
        "list-after-garbage",
        400,
        "invalid_value",
        "after",
        method="get",
        path="/v1/fine_tuning/jobs?after=%27%3B%20DROP%20TABLE%20x",
    ),
    Case(
        "list-after-too-long",
        400,
        "invalid_value",
        "after",
        method="get",
        path="/v1/files?after=" + "a" * 300,
    ),
    Case(
        "list-after-foreign",
        400,
        "invalid_value",
        "after",
        method="get",
        path="/v1/files?after={foreign_file}",
    ),
    Case(
        "list-metadata-lookup",
        400,
        "invalid_value",
        "metadata",
        method="get",
        path="/v1/fine_tuning/jobs?metadata[k__contains]=x",
    ),
    Case("nul-in-path", 400, "invalid_url", method="get", path="/v1/files/file-%00x"),
    Case("nul-in-query", 400, "invalid_url", method="get", path="/v1/files?purpose=%00"),
    Case("nul-in-model-path", 400, "invalid_url", method="delete", path="/v1/models/ft:%00"),
    Case("newline-in-model-path", 404, "unknown_url", method="get", path="/v1/models/a%0Ab"),
    Case("huge-id", 404, "not_found", "id", method="get", path="/v1/files/" + "f" * 5000),
    Case(
        "foreign-file-content",
        404,
        "not_found",
        "id",
        method="get",
        path="/v1/files/{foreign_file}/content",
    ),
    Case(
        "foreign-job-cancel",
        404,
        "not_found",
        "fine_tuning_job_id",
        path="/v1/fine_tuning/jobs/{foreign_job}/cancel",
    ),
    Case(
        "bad-auth-header-binary",
        401,
        "invalid_api_key",
        method="get",
        path="/v1/models",
        headers={"HTTP_AUTHORIZATION": "Bearer \xff\xfe"},
    ),
    Case(
        "bad-auth-header-huge",
        401,
        "invalid_api_key",
        method="get",
        path="/v1/models",
        headers={"HTTP_AUTHORIZATION": "Bearer " + "k" * 100_000},
    ),
]


class World(dict[str, str]):
    """The caller's own valid file, and another user's file, job and adapter: each made on
    first use (``str.format_map``), so a case pays only for the records it names."""

    def __init__(self, user: Any, base: Any, make_adapter: Any):
        super().__init__()
        self.user, self.base, self.make_adapter = user, base, make_adapter
        self.stranger: Any = None

    def __missing__(self, key: str) -> str:
        if self.stranger is None:
            self.stranger = UserFactory()
        if key == "file":
            value = FileFactory(owner=self.user, content=toy_jsonl(12)).id
        elif key in ("foreign_file", "foreign_job"):
            job = FineTuningJobFactory(owner=self.stranger, status="queued")
            self["foreign_file"], self["foreign_job"] = job.training_file_id, job.id
            return str(self[key])
        elif key == "foreign_adapter":
            value = self.make_adapter(self.stranger, self.base, seed=3).name
        else:
            raise KeyError(key)
        self[key] = value
        return value


@pytest.fixture
def world(user: Any, lively_base_model: Any, make_adapter: Any) -> World:
    return World(user, lively_base_model, make_adapter)


def _fill(value: Any, world: World) -> Any:
    """Replace ``{placeholders}`` (own and foreign ids) in a JSON body."""
    if isinstance(value, str):
        return value.format_map(world) if "{" in value and "}" in value else value
    if isinstance(value, dict):
        return {k: _fill(v, world) for k, v in value.items() if v is not UNSET}
    if isinstance(value, list):
        return [_fill(v, world) for v in value]
    return value


def _prepare(api: Any, case: Case, world: World) -> Any:
    """The request, ready to send: every record it names exists before the snapshot."""
    path = case.path.format_map(world) if "{" in case.path else case.path
    method, headers = case.method.upper(), case.headers
    if case.upload is not None or case.form is not None:
        form = dict(case.form) if case.form is not None else {"purpose": "fine-tune", "file": "@"}
        if form.get("file") == "@":
            data = case.upload if case.upload is not None else toy_jsonl(2)
            form["file"] = SimpleUploadedFile(case.filename, data)
        return lambda: api.post(path, form, format="multipart", **headers)
    if case.raw is not None:
        raw = case.raw
        if b"{file}" in raw:
            raw = raw.replace(b"{file}", world["file"].encode())
        return lambda: api.generic(method, path, raw, case.content_type, **headers)
    if case.json is not UNSET:
        body = {**case.base, **case.json} if isinstance(case.json, dict) else case.json
        text = json.dumps(_fill(body, world), allow_nan=True)
        return lambda: api.generic(method, path, text, case.content_type, **headers)
    return lambda: getattr(api, case.method)(path, **headers)


def _snapshot(data_dir: Path) -> tuple[Any, ...]:
    counts = tuple(
        model.objects.count()
        for model in (File, FineTuningJob, JobEvent, Checkpoint, Adapter, FeatureSet)
    )
    stored = sorted(str(p.relative_to(data_dir)) for p in data_dir.rglob("*") if p.is_file())
    return counts, stored


def test_the_corpus_is_large_enough() -> None:
    """At least 40 hostile inputs, each with its own name."""
    assert len(CASES) >= 40
    assert len({case.id for case in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_a_hostile_request_is_a_clear_4xx_and_creates_nothing(
    case: Case, api: Any, world: World, settings: Any, data_dir: Path
) -> None:
    """The expected status and error code, OpenAI's error shape, no record, no stored file."""
    settings.CARRY_ON = {**settings.CARRY_ON, **case.carry_on}
    for name, value in case.settings.items():
        setattr(settings, name, value)
    if case.headers.get("HTTP_AUTHORIZATION"):
        api.credentials(**case.headers)
    send = _prepare(api, case, world)
    before = _snapshot(data_dir)
    response = send()

    assert response.status_code == case.status, response.content[:500]
    body = response.json()
    assert set(body) == {"error"}
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"
    assert error["code"] == case.code, error
    if case.param is not UNSET:
        assert error["param"] == case.param, error
    assert case.message in error["message"], error
    assert _snapshot(data_dir) == before


def test_an_uploaded_name_is_only_ever_a_display_name(api: Any, lively_base_model: Any) -> None:
    """Path traversal, control characters and huge names are stored as a safe display name."""
    names = {
        "../../etc/passwd": "passwd",
        "..\\..\\windows\\system32\\x.jsonl": "x.jsonl",
        "/abs/path/train.jsonl": "train.jsonl",
        "evil\x00\x1b[31m.jsonl": "evil[31m.jsonl",
        "n" * 1000: "n" * 255,
    }
    for name, shown in names.items():
        upload = SimpleUploadedFile("x.jsonl", toy_jsonl(2))
        upload.name = name  # as the client sent it: Django would already strip some of it
        response = api.post("/v1/files", {"file": upload, "purpose": "fine-tune"})
        assert response.status_code == 200, response.json()
        file = File.objects.get(pk=response.json()["id"])
        assert file.filename == shown
        assert file.path == f"files/{file.id}.jsonl"


def test_an_oversized_json_body_is_refused_before_it_is_read(
    api: Any, lively_base_model: Any
) -> None:
    """A declared body above the limit is a 413 without reading it."""
    response = api.generic(
        "POST", CHAT, io.BytesIO(b"{}").read(), "application/json", CONTENT_LENGTH=str(10**9)
    )
    assert response.status_code == 413


def test_a_nul_in_a_browser_page_url_is_a_400(user: Any, lively_base_model: Any) -> None:
    """Browser pages refuse NUL in the URL too (PostgreSQL cannot compare it: never a 500)."""
    from django.test import Client

    from tests.factories import PASSWORD

    client = Client()
    assert client.login(username=user.username, password=PASSWORD)
    for url in ("/files/file-%00/", "/jobs/?page=%00", "/accounts/login/?next=%00"):
        assert client.get(url).status_code == 400, url
