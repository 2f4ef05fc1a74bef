"""Uploading datasets: size limits, validation with line numbers, token counts, storage."""

from __future__ import annotations

import hashlib
import os
import re
from typing import Any, BinaryIO, Protocol

from django.conf import settings
from django.db import transaction
from django.db.models import Q

from webapp.accounts.models import User
from webapp.core.exceptions import ApplicationError, ConflictError, PayloadTooLargeError
from webapp.core.utils import data_path, remove_artifact, write_bytes_atomic
from webapp.customizations.models import BaseModel, FeatureSet, File, FineTuningJob
from webapp.customizations.quotas import quota_check_storage
from webapp.customizations.services.base_models import base_tokenizer

PURPOSES = ("fine-tune",)
MAX_PROBLEMS_SHOWN = 200
_UNSAFE_NAME = re.compile(r"[\x00-\x1f\x7f]")


class Upload(Protocol):
    """What Django's UploadedFile offers and file_create needs."""

    name: str | None
    size: int | None

    def chunks(self, chunk_size: int | None = None) -> Any: ...


def _read_upload(upload: Upload, limit: int) -> bytes:
    if upload.size is not None and upload.size > limit:
        raise PayloadTooLargeError(
            f"The file is {upload.size} bytes; the limit is {limit} bytes.",
            param="file",
            code="file_too_large",
        )
    parts: list[bytes] = []
    total = 0
    for chunk in upload.chunks():
        total += len(chunk)
        if total > limit:
            raise PayloadTooLargeError(
                f"The file is larger than the limit of {limit} bytes.",
                param="file",
                code="file_too_large",
            )
        parts.append(chunk)
    return b"".join(parts)


def display_filename(name: str | None) -> str:
    """The uploaded name for display only: no directories, no control characters."""
    base = os.path.basename((name or "").replace("\\", "/"))
    return _UNSAFE_NAME.sub("", base)[:255] or "upload.jsonl"


def validate_dataset(data: bytes, *, base: BaseModel | None) -> dict[str, Any]:
    """Structure (every problem with its line) and, with a base, token counts per example."""
    from customization.datasets import DatasetLimits, parse_dataset
    from customization.errors import DatasetFormatError
    from customization.tokenizer import tokenize_examples

    limits = DatasetLimits(max_bytes=settings.CARRY_ON_MAX_UPLOAD_BYTES)
    parsed = parse_dataset(data, limits=limits)
    report = parsed.report.to_dict()
    problems = list(report["problems"])
    token_limit = int(settings.CARRY_ON["MAX_EXAMPLE_TOKENS"])
    report.update(n_tokens=None, max_example_tokens=None, token_limit=token_limit, tokenizer=None)
    if base is not None and parsed.examples:
        tokenizer = base_tokenizer(base)
        report["tokenizer"] = base.name
        try:
            tokenized = tokenize_examples(
                parsed.examples, tokenizer, max_length=token_limit, overflow="error"
            )
        except DatasetFormatError as exc:
            problems.extend(p.to_dict() for p in exc.problems)
        else:
            lengths = [len(t.input_ids) for t in tokenized]
            report.update(n_tokens=sum(lengths), max_example_tokens=max(lengths))
            report["n_loss_tokens"] = sum(t.n_targets for t in tokenized)  # the time estimate
    # Line problems in file order, whole-file problems (line 0) after them.
    problems.sort(key=lambda p: (p["line"] == 0, p["line"]))
    if len(problems) > MAX_PROBLEMS_SHOWN:
        hidden = len(problems) - MAX_PROBLEMS_SHOWN
        problems = problems[:MAX_PROBLEMS_SHOWN]
        problems.append(
            {"line": 0, "message": f"{hidden} more problem(s) not shown", "snippet": ""}
        )
    report.update(problems=problems, ok=not problems)
    return report


def file_create(
    *, user: User, upload: Upload, purpose: str = "fine-tune", keep_invalid: bool = True
) -> File:
    """Store and validate an upload.

    An invalid file is kept with status ``error`` (the browser shows its report), or, with
    ``keep_invalid=False`` (the API), refused with a 400 naming its lines and not stored.
    """
    if purpose not in PURPOSES:
        raise ApplicationError(
            f"purpose must be one of {', '.join(PURPOSES)}", param="purpose", code="invalid_purpose"
        )
    data = _read_upload(upload, settings.CARRY_ON_MAX_UPLOAD_BYTES)
    base = BaseModel.objects.filter(is_default=True, enabled=True).first()
    report = validate_dataset(data, base=base)
    if not report["ok"] and not keep_invalid:
        raise ApplicationError(_report_summary(report), param="file", code="invalid_training_file")
    file = File(
        owner=user,
        purpose=purpose,
        filename=display_filename(upload.name),
        bytes=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
        format=report["format"] or "",
        n_lines=report["n_lines"],
        n_examples=report["n_examples"],
        n_tokens=report["n_tokens"],
        max_example_tokens=report["max_example_tokens"],
        report=report,
        status=File.Status.PROCESSED if report["ok"] else File.Status.ERROR,
    )
    # The artifact first, then the row that points at it; an orphan is left to gc.
    relative = f"files/{file.id}.jsonl"
    with transaction.atomic():  # the storage quota counts one upload of a user at a time
        quota_check_storage(user=user, adding=len(data))
        write_bytes_atomic(data_path(relative), data)
        file.path = relative
        file.save()
    return file


def _report_summary(report: dict[str, Any], shown: int = 5) -> str:
    problems = report["problems"]
    lines = "; ".join(
        (f"line {p['line']}: " if p["line"] else "") + p["message"] for p in problems[:shown]
    )
    more = f" (and {len(problems) - shown} more)" if len(problems) > shown else ""
    return f"The file has {len(problems)} problem(s): {lines}{more}"


def file_open(*, file: File) -> BinaryIO:
    """The stored content, open for reading: for streaming it or reading its head."""
    try:
        return data_path(file.path).open("rb")
    except (FileNotFoundError, ValueError):
        raise _missing(file) from None


def _missing(file: File) -> ApplicationError:
    return ApplicationError(
        f"the content of {file.id} is missing from storage",
        code="file_missing",
        status=500,
        type="server_error",
    )


def file_read(*, file: File) -> bytes:
    try:
        return data_path(file.path).read_bytes()
    except (FileNotFoundError, ValueError):
        raise _missing(file) from None


def feature_scope(owner_id: int) -> str:
    """The part of a feature set's dataset digest that keeps it to one owner."""
    return f"owner-{owner_id}"


@transaction.atomic
def file_delete(*, file: File) -> None:
    """Delete a file, its stored content and, if no copy remains, features made from it."""
    busy = FineTuningJob.objects.filter(
        status__in=[
            FineTuningJob.Status.VALIDATING_FILES,
            FineTuningJob.Status.QUEUED,
            FineTuningJob.Status.RUNNING,
        ]
    ).filter(Q(training_file=file) | Q(validation_file=file))
    if busy.exists():
        raise ConflictError(
            f"{file.id} is used by an active fine-tuning job; cancel it first", code="file_in_use"
        )
    path, sha, owner = file.path, file.sha256, file.owner_id
    file.delete()
    removed: list[str] = [path]
    # Hidden states are derived from the user's data: they go with the owner's last copy
    # (features are cached per owner; unscoped ones of older versions with the last copy).
    prefixes = (
        []
        if File.objects.filter(sha256=sha, owner_id=owner).exists()
        else [f"{sha}:{feature_scope(owner)}"]
    )
    if not File.objects.filter(sha256=sha).exists():
        prefixes.append(sha)
    for prefix in prefixes:
        derived = FeatureSet.objects.filter(dataset_sha256__startswith=prefix)
        removed.extend(fs.path for fs in derived if fs.path)
        derived.delete()
    transaction.on_commit(lambda: [remove_artifact(p) for p in removed])
