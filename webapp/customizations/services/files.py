"""Uploading datasets: size limits, validation with line numbers, tokenization, storage.

Validation tokenizes every example with the default base; the upload keeps that
tokenization beside the file (``files/<id>.tokens.json``), so planning and extraction of a
job on the same base read it instead of tokenizing again (``file_tokenization``).
"""

from __future__ import annotations

import base64
import functools
import hashlib
import itertools
import json
import os
import re
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from django.conf import settings
from django.db import transaction
from django.db.models import Q

from webapp.accounts.models import User
from webapp.core.exceptions import ApplicationError, ConflictError, PayloadTooLargeError
from webapp.core.utils import data_path
from webapp.customizations.artifacts import (
    remove_artifact,
    upload_path,
    upload_tokens_path,
    write_bytes_atomic,
)
from webapp.customizations.models import BaseModel, FeatureSet, File, FineTuningJob
from webapp.customizations.quotas import quota_check_storage
from webapp.customizations.selectors import base_tokenizer

if TYPE_CHECKING:
    from customization.tokenizer import TokenizedExample

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
    return _validate(data, base=base)[0]


def _validate(
    data: bytes, *, base: BaseModel | None
) -> tuple[dict[str, Any], list[TokenizedExample]]:
    """The report and every example tokenized whole (empty without a base or on a problem)."""
    from customization.datasets import DatasetLimits, parse_dataset
    from customization.errors import DatasetFormatError
    from customization.tokenizer import tokenize_examples

    limits = DatasetLimits(max_bytes=settings.CARRY_ON_MAX_UPLOAD_BYTES)
    parsed = parse_dataset(data, limits=limits)
    report = parsed.report.to_dict()
    problems = list(report["problems"])
    token_limit = int(settings.CARRY_ON["MAX_EXAMPLE_TOKENS"])
    report.update(n_tokens=None, max_example_tokens=None, token_limit=token_limit, tokenizer=None)
    tokenized: list[TokenizedExample] = []
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
    return report, tokenized


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
    report, tokenized = _validate(data, base=base)
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
    relative = upload_path(file.id)
    with transaction.atomic():  # the storage quota counts one upload of a user at a time
        quota_check_storage(user=user, adding=len(data))
        write_bytes_atomic(data_path(relative), data)
        if base is not None and tokenized and report["ok"]:
            _write_tokenization(
                relative,
                base,
                tokenized,
                max_length=report["token_limit"],
                within_bytes=len(data) + TOKENS_ALLOWANCE,
            )
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


def _tokenizer_key(base: BaseModel) -> str:
    """What a tokenization depends on: the base, and its tokenizer file as base_tokenizer
    sees it."""
    stamp = (Path(base.path) / "tokenizer.json").stat().st_mtime_ns
    return f"{base.pk}:{base.fingerprint_key}:{stamp}"


# The stored tokenization (files/<id>.tokens.json): each example's line, token count and
# target tokens as [start, stop) spans in JSON, and every token id in one zlib-compressed
# run of little-endian integers (2 bytes each when every id fits, else 4), base64. Examples
# are whole: validation refuses one over the token limit instead of cutting it. Size: at
# most 8/3 bytes a token (16/3 with 4-byte ids) plus about 20 bytes an example; with
# SmolLM2 it measured 0.29-0.81x the upload (GSM8K 0.45x, one-word examples 0.66x, random
# CJK text 0.81x), so about 30-50 MiB for an upload at the 64 MiB limit, and a token per
# upload byte (what the tiniest examples reach) bounds it near 2.7x. The storage quota counts
# the upload only, so a tokenization larger than the upload (plus a small allowance) is not
# kept: the disk a user holds stays within twice their quota, and such a file's jobs tokenize.
TOKENS_FORMAT_VERSION = 2
TOKENS_ALLOWANCE = 4096


def _spans(mask: list[int]) -> list[list[int]]:
    """The [start, stop) runs of 1s in a target mask."""
    spans: list[list[int]] = []
    for i, flag in enumerate(mask):
        if flag and spans and spans[-1][1] == i:
            spans[-1][1] = i + 1
        elif flag:
            spans.append([i, i + 1])
    return spans


def _id_format(id_bytes: int, n: int) -> str:
    return f"<{n}{'H' if id_bytes == 2 else 'I'}"


def _write_tokenization(
    upload: str,
    base: BaseModel,
    tokenized: list[TokenizedExample],
    *,
    max_length: int,
    within_bytes: int,
) -> None:
    """Keep what validation tokenized, so a job on this base does not tokenize it again;
    nothing is kept when it would take more than ``within_bytes``."""
    ids = [i for t in tokenized for i in t.input_ids]
    id_bytes = 2 if max(ids) < 2**16 else 4
    packed = zlib.compress(struct.pack(_id_format(id_bytes, len(ids)), *ids))
    sidecar = {
        "format_version": TOKENS_FORMAT_VERSION,
        "tokenizer": _tokenizer_key(base),
        "max_length": max_length,  # the token limit at upload
        "lines": [t.line for t in tokenized],
        "lengths": [len(t.input_ids) for t in tokenized],
        "targets": [_spans(t.target_mask) for t in tokenized],
        "id_bytes": id_bytes,
        "ids": base64.b64encode(packed).decode(),
    }
    encoded = json.dumps(sidecar).encode()
    if len(encoded) <= within_bytes:
        write_bytes_atomic(data_path(upload_tokens_path(upload)), encoded)


@dataclass(frozen=True)
class StoredTokenization:
    """An upload's examples as validation tokenized them, by line; counts are read as is,
    the token ids decompressed on first use."""

    lines: dict[int, int]  # line -> position in the file's examples
    lengths: list[int]
    targets: list[list[list[int]]]
    id_bytes: int
    packed_ids: str

    def length(self, line: int) -> int | None:
        """The example's token count; None for a line that holds no example."""
        index = self.lines.get(line)
        return None if index is None else self.lengths[index]

    @functools.cached_property
    def _ids(self) -> tuple[list[int], list[int]] | None:
        """Every token id and where each example's ids start; None when they do not decode."""
        try:
            raw = zlib.decompress(base64.b64decode(self.packed_ids))
            ids = list(struct.unpack(_id_format(self.id_bytes, sum(self.lengths)), raw))
        except (zlib.error, struct.error, ValueError):
            return None
        return ids, list(itertools.accumulate(self.lengths, initial=0))

    def examples(self, lines: list[int]) -> list[TokenizedExample] | None:
        """The examples at ``lines``, token ids and target masks exactly as tokenizing them
        gives; None when a line holds no stored example or the stored ids are damaged."""
        from customization.tokenizer import TokenizedExample

        indices = [self.lines.get(line) for line in lines]
        if self._ids is None or None in indices:
            return None
        ids, starts = self._ids
        examples = []
        for line, index in zip(lines, indices, strict=True):
            assert index is not None
            mask = [0] * self.lengths[index]
            for start, stop in self.targets[index]:
                mask[start:stop] = [1] * (stop - start)
            ids_of = ids[starts[index] : starts[index + 1]]
            examples.append(TokenizedExample(ids_of, mask, line=line))
        return examples


def file_tokenization(*, file: File, base: BaseModel) -> StoredTokenization | None:
    """The upload's tokenization of its examples with ``base``'s tokenizer; None when it was
    made with another tokenizer (another base, a changed tokenizer file), by an older
    version, or not kept."""
    try:
        sidecar = json.loads(data_path(upload_tokens_path(file.path)).read_bytes())
        if (
            sidecar.get("format_version") != TOKENS_FORMAT_VERSION
            or sidecar.get("tokenizer") != _tokenizer_key(base)
            or sidecar["id_bytes"] not in (2, 4)
        ):
            return None
        return StoredTokenization(
            lines={int(line): i for i, line in enumerate(sidecar["lines"])},
            lengths=[int(n) for n in sidecar["lengths"]],
            targets=sidecar["targets"],
            id_bytes=int(sidecar["id_bytes"]),
            packed_ids=str(sidecar["ids"]),
        )
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


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
    removed: list[str] = [path, upload_tokens_path(path)]
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
