"""Parse, validate and normalize JSONL training datasets.

Three formats are accepted; a file uses one of them, detected from its first JSON object
that has the keys of a format:

- ``chat``: OpenAI chat, ``{"messages": [{"role": ..., "content": ...}, ...]}``.
- ``cot``: ``{"question", "answer"}`` (GSM8K style: the answer holds the worked reasoning
  and ends with ``#### N``), or ``{"question", "reasoning" | "chain_of_thought", "answer"}``.
- ``prompt_completion``: ``{"prompt", "completion"}``.

Every example is normalized to a tuple of ``{"role", "content"}`` messages (plus
``"weight": "0" | "1"`` on chat messages that gave one), so later stages see one shape.

Line numbers are 1-based physical lines, as an editor shows them: blank lines are skipped
but counted, a UTF-8 BOM and CRLF endings are accepted. A problem with ``line == 0``
(``WHOLE_FILE``) concerns the whole file: empty, too large, too few examples.

Validation runs at upload time in the web process, so this module uses the standard
library only and never raises for bad content: every problem goes in the report.

Sections, in order: limits and results; entry points (parse, load, split, hash); file
level; line level; JSON objects and format detection; normalization; field checks and
messages.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal, NoReturn

from customization.errors import DatasetFormatError, DatasetProblem

DatasetFormat = Literal["chat", "cot", "prompt_completion"]

WHOLE_FILE = 0
"""The line number of a problem that concerns the whole file rather than one line."""

# json.loads recurses once per nesting level, so the configurable depth must stay well
# below Python's recursion limit.
_DEPTH_CEILING = 500
_SNIPPET_CHARS = 80
_UTF8_BOM = b"\xef\xbb\xbf"
_UTF16_BOMS = (b"\xff\xfe", b"\xfe\xff")
# Cc characters other than \t \n \r: invisible in the browser yet changing what is trained.
_CONTROL_CHAR = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
# Possessive quantifiers keep this linear even on hostile input (unterminated strings,
# runs of escaped quotes); an unterminated string runs to the end of the line.
_JSON_STRING = re.compile(r'"[^"\\]*+(?:\\.[^"\\]*+)*+"?', re.DOTALL)
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")
# A \uD800-\uDFFF escape: half of a UTF-16 pair, or (unpaired) not text at all.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")

_ROLES = frozenset({"system", "user", "assistant"})
_ROLE_ALIASES = {"developer": "system"}
_MESSAGE_KEYS = frozenset({"role", "content", "weight", "name"})
_FORMAT_KEYS: dict[DatasetFormat, frozenset[str]] = {
    "chat": frozenset({"messages", "tools", "parallel_tool_calls", "metadata"}),
    "cot": frozenset({"question", "answer", "reasoning", "chain_of_thought", "metadata"}),
    "prompt_completion": frozenset({"prompt", "completion", "metadata"}),
}
# Keys that identify a format, in detection order.
_SIGNATURE_KEYS: dict[DatasetFormat, frozenset[str]] = {
    "chat": frozenset({"messages"}),
    "cot": frozenset({"question", "answer", "reasoning", "chain_of_thought"}),
    "prompt_completion": frozenset({"prompt", "completion"}),
}
_MAX_NAMES_SHOWN = 8
_MAX_VALUE_CHARS = 40


# -- limits and results -----------------------------------------------------------------------


@dataclass(frozen=True)
class DatasetLimits:
    """Upload limits; token limits are checked later, once a tokenizer is known."""

    max_bytes: int = 64 * 1024 * 1024
    max_lines: int = 200_000
    max_line_bytes: int = 1 * 1024 * 1024
    max_chars_per_example: int = 64_000
    min_examples: int = 1
    max_nesting_depth: int = 20

    def __post_init__(self) -> None:
        for name in ("max_bytes", "max_lines", "max_line_bytes", "max_chars_per_example"):
            value = getattr(self, name)
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if self.min_examples < 1:
            raise ValueError(f"min_examples must be >= 1, got {self.min_examples}")
        if not 1 <= self.max_nesting_depth <= _DEPTH_CEILING:
            raise ValueError(
                f"max_nesting_depth must be between 1 and {_DEPTH_CEILING}, "
                f"got {self.max_nesting_depth}"
            )


DEFAULT_LIMITS = DatasetLimits()


@dataclass(frozen=True)
class Example:
    """One normalized training example and the line it came from."""

    messages: tuple[dict[str, str], ...]
    line: int


@dataclass
class DatasetReport:
    """What validation found; stored with the uploaded file and shown to the user."""

    format: DatasetFormat | None
    n_lines: int
    n_examples: int
    problems: list[DatasetProblem]

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, object]:
        return {
            "format": self.format,
            "n_lines": self.n_lines,
            "n_examples": self.n_examples,
            "ok": self.ok,
            "problems": [problem.to_dict() for problem in self.problems],
        }


@dataclass
class ParsedDataset:
    """The valid examples and the report; examples are partial when the report has problems."""

    examples: list[Example]
    report: DatasetReport


# -- entry points: parse, load, split, hash ---------------------------------------------------


class _Invalid(Exception):
    """Internal: the current line has a problem; the message says which."""


def _invalid(message: str) -> NoReturn:
    raise _Invalid(message)


def parse_dataset(
    data: bytes, *, limits: DatasetLimits = DEFAULT_LIMITS, max_problems: int = 100
) -> ParsedDataset:
    """Parse and validate a JSONL dataset.

    Never raises for bad content: every problem goes in ``report.problems`` with its line.
    ``max_problems`` caps the per-line problems; whole-file problems (limits, too few
    examples) are always reported, and a final problem says how many were left out.
    """
    if max_problems < 1:
        raise ValueError(f"max_problems must be >= 1, got {max_problems}")
    n_lines = _count_lines(data)
    if data.startswith(_UTF16_BOMS):
        message = "the file is UTF-16 encoded; save it as UTF-8"
        report = DatasetReport(None, n_lines, 0, [DatasetProblem(WHOLE_FILE, message)])
        return ParsedDataset([], report)
    limit_problem = _limit_problem(data, n_lines, limits)
    stop_line = limit_problem.line if limit_problem else n_lines + 1
    parser = _LineParser(limits, max_problems)
    for lineno, raw in _iter_lines(data, stop_line):
        parser.feed(lineno, raw)
    problems = parser.problems
    if limit_problem:
        problems.append(limit_problem)
    problems.extend(_whole_file_problems(parser, limits, truncated=limit_problem is not None))
    if parser.n_dropped:
        message = (
            f"too many problems; showing the first {max_problems} "
            f"({parser.n_dropped} more not shown)"
        )
        problems.append(DatasetProblem(WHOLE_FILE, message))
    report = DatasetReport(parser.format, n_lines, len(parser.examples), problems)
    return ParsedDataset(parser.examples, report)


def load_dataset(data: bytes, *, limits: DatasetLimits = DEFAULT_LIMITS) -> list[Example]:
    """Like ``parse_dataset`` but raises ``DatasetFormatError`` if there is any problem."""
    parsed = parse_dataset(data, limits=limits)
    if parsed.report.problems:
        raise DatasetFormatError(parsed.report.problems)
    return parsed.examples


def read_dataset_file(
    path: str | os.PathLike[str], *, limits: DatasetLimits = DEFAULT_LIMITS
) -> list[Example]:
    """Load a dataset from disk; reads at most one byte past ``max_bytes``."""
    with open(path, "rb") as f:
        # One byte past the limit is enough for the size problem to name its line.
        data = f.read(limits.max_bytes + 1)
    return load_dataset(data, limits=limits)


def split_examples(
    examples: Sequence[Example],
    *,
    valid_fraction: float,
    seed: int,
    max_valid: int | None = None,
) -> tuple[list[Example], list[Example]]:
    """Split into (train, valid) by a shuffle seeded with ``seed``; each keeps file order.

    At least one training example always stays; valid is empty when ``valid_fraction``
    is 0 or there is a single example, and holds at least one example otherwise.
    """
    if not 0.0 <= valid_fraction < 1.0:
        raise ValueError(f"valid_fraction must be in [0, 1), got {valid_fraction}")
    if max_valid is not None and max_valid < 0:
        raise ValueError(f"max_valid must be >= 0 or None, got {max_valid}")
    if not examples:
        raise ValueError("cannot split an empty list of examples")
    n_valid = max(1, round(len(examples) * valid_fraction)) if valid_fraction > 0 else 0
    if max_valid is not None:
        n_valid = min(n_valid, max_valid)
    n_valid = min(n_valid, len(examples) - 1)
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    valid_indices = set(order[:n_valid])
    train = [ex for i, ex in enumerate(examples) if i not in valid_indices]
    valid = [ex for i, ex in enumerate(examples) if i in valid_indices]
    return train, valid


def dataset_sha256(data: bytes) -> str:
    """Hex sha256 of the raw upload: the dataset part of the feature-cache key."""
    return hashlib.sha256(data).hexdigest()


def split_digest(
    file_sha256: str,
    *,
    part: str,
    valid_fraction: float,
    max_valid: int | None,
    seed: int,
    scope: str = "",
) -> str:
    """The dataset digest of one part ("train" or "valid") of a split upload.

    The same bytes split the same way give the same digest, whoever splits them, so the
    feature cache is shared; ``scope`` keeps one owner's cache entries apart from another's.
    """
    return f"{file_sha256}:{scope}:{part}:{valid_fraction}:{max_valid}:{seed}"


# -- file level: size, line count, whole-file problems ----------------------------------------


def _count_lines(data: bytes) -> int:
    if not data:
        return 0
    return data.count(b"\n") + (0 if data.endswith(b"\n") else 1)


def _iter_lines(data: bytes, stop_line: int) -> Iterator[tuple[int, bytes]]:
    """Yield (line number, raw line without its line ending) for lines before stop_line."""
    start = len(_UTF8_BOM) if data.startswith(_UTF8_BOM) else 0
    lineno = 1
    while start < len(data) and lineno < stop_line:
        end = data.find(b"\n", start)
        if end == -1:
            end = len(data)
        line = data[start:end]
        yield lineno, line[:-1] if line.endswith(b"\r") else line
        start = end + 1
        lineno += 1


def _limit_problem(data: bytes, n_lines: int, limits: DatasetLimits) -> DatasetProblem | None:
    """The size or line-count problem at the first line past a limit, if any."""
    found: list[DatasetProblem] = []
    if len(data) > limits.max_bytes:
        line = data.count(b"\n", 0, limits.max_bytes) + 1
        message = f"the file is larger than the limit of {limits.max_bytes} bytes"
        found.append(DatasetProblem(line, f"{message}; it is exceeded on this line"))
    if n_lines > limits.max_lines:
        message = f"the file has more than the limit of {limits.max_lines} lines"
        found.append(DatasetProblem(limits.max_lines + 1, message))
    return min(found, key=lambda problem: problem.line, default=None)


def _whole_file_problems(
    parser: _LineParser, limits: DatasetLimits, *, truncated: bool
) -> list[DatasetProblem]:
    if not parser.saw_content and not truncated:
        return [DatasetProblem(WHOLE_FILE, "the file is empty")]
    n_examples = len(parser.examples)
    if n_examples < limits.min_examples:
        message = (
            f"the file has {n_examples} valid example(s); at least {limits.min_examples} are needed"
        )
        return [DatasetProblem(WHOLE_FILE, message)]
    return []


def _snippet(raw: bytes) -> str:
    """The start of a line, safe to show: undecodable bytes and control chars escaped."""
    text = raw[: _SNIPPET_CHARS * 4].decode("utf-8", errors="backslashreplace")
    head = text[:_SNIPPET_CHARS]
    shown = "".join(
        ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii") for ch in head
    )
    truncated = len(text) > _SNIPPET_CHARS or len(raw) > _SNIPPET_CHARS * 4
    return shown + "..." if truncated else shown


# -- line level: one JSON object, its format, its example -------------------------------------


@dataclass
class _LineParser:
    """Turns lines into examples or problems, remembering the file's format."""

    limits: DatasetLimits
    max_problems: int
    examples: list[Example] = field(default_factory=list)
    problems: list[DatasetProblem] = field(default_factory=list)
    n_dropped: int = 0
    saw_content: bool = False
    format: DatasetFormat | None = None
    format_line: int = 0

    def feed(self, lineno: int, raw: bytes) -> None:
        try:
            example = self._parse(lineno, raw)
        except _Invalid as exc:
            self.saw_content = True
            if len(self.problems) < self.max_problems:
                self.problems.append(DatasetProblem(lineno, str(exc), _snippet(raw)))
            else:
                self.n_dropped += 1
            return
        if example is not None:
            self.saw_content = True
            self.examples.append(example)

    def _parse(self, lineno: int, raw: bytes) -> Example | None:
        """The line's example, None for a blank line; raises _Invalid for a problem."""
        if len(raw) > self.limits.max_line_bytes:
            _invalid(f"the line is {len(raw)} bytes; the limit is {self.limits.max_line_bytes}")
        if b"\x00" in raw:
            _invalid("the line contains NUL bytes; is this a binary file?")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            _invalid(
                f"invalid UTF-8: byte 0x{raw[exc.start]:02x} at byte {exc.start + 1} of the line"
            )
        if not text.strip():
            return None
        obj = _load_json_object(text, self.limits.max_nesting_depth)
        messages = _NORMALIZERS[self._check_format(lineno, obj)](obj)
        n_chars = sum(len(message["content"]) for message in messages)
        if n_chars > self.limits.max_chars_per_example:
            limit = self.limits.max_chars_per_example
            _invalid(f"the example has {n_chars} characters; the limit is {limit}")
        return Example(messages, lineno)

    def _check_format(self, lineno: int, obj: Mapping[str, object]) -> DatasetFormat:
        fmt = _detect_format(obj)
        if fmt is None:
            _invalid(
                f"unrecognized example with {_keys_phrase(obj)}; expected "
                '"messages", "question" and "answer", or "prompt" and "completion"'
            )
        if self.format is None:
            self.format, self.format_line = fmt, lineno
        elif fmt != self.format:
            _invalid(
                f"this line is in the {fmt} format but the file is in the {self.format} "
                f"format (detected on line {self.format_line}); use one format per file"
            )
        return fmt


# -- JSON objects and format detection --------------------------------------------------------


def _load_json_object(text: str, max_depth: int) -> dict[str, object]:
    if _exceeds_depth(text, max_depth):
        _invalid(f"the JSON is nested deeper than {max_depth} levels")
    try:
        value = _DECODER.decode(text)
    except json.JSONDecodeError as exc:
        _invalid(f"invalid JSON at column {exc.colno}: {exc.msg.removesuffix(' at')}")
    except (ValueError, RecursionError) as exc:
        _invalid(f"invalid JSON: {exc}")
    if not isinstance(value, dict):
        _invalid(f"expected a JSON object, got {_json_type(value)}")
    if _SURROGATE_ESCAPE.search(text) and _has_lone_surrogate(value):
        # json accepts "\ud800" alone, but no tokenizer, database or UTF-8 encoder does.
        _invalid("the line contains an unpaired surrogate escape (\\ud800-\\udfff); it is not text")
    return value


def _has_lone_surrogate(value: object) -> bool:
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _exceeds_depth(text: str, max_depth: int) -> bool:
    """Bracket depth outside strings, found without recursion (json.loads would recurse)."""
    if text.count("[") + text.count("{") <= max_depth:
        return False
    brackets = _NOT_BRACKET.sub("", _JSON_STRING.sub("", text))
    depth = 0
    for ch in brackets:
        depth += 1 if ch in "[{" else -1
        if depth > max_depth:
            return True
    return False


def _unique_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    # Python keeps the last duplicate silently; the user most likely meant something else.
    obj: dict[str, object] = {}
    for key, value in pairs:
        if key in obj:
            raise ValueError(f"duplicate key {_short(key)}")
        obj[key] = value
    return obj


def _no_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not allowed")


_DECODER = json.JSONDecoder(object_pairs_hook=_unique_keys, parse_constant=_no_constant)


def _detect_format(obj: Mapping[str, object]) -> DatasetFormat | None:
    for fmt, keys in _SIGNATURE_KEYS.items():
        if not keys.isdisjoint(obj):
            return fmt
    return None


# -- normalization: each format to messages ---------------------------------------------------


def _normalize_chat(obj: Mapping[str, object]) -> tuple[dict[str, str], ...]:
    _check_keys(obj, _FORMAT_KEYS["chat"], "the example")
    messages = obj["messages"]
    if not isinstance(messages, list):
        _invalid(f'"messages" must be an array, got {_json_type(messages)}')
    if not messages:
        _invalid('"messages" is empty')
    normalized = tuple(_normalize_message(message, i) for i, message in enumerate(messages))
    for i, message in enumerate(normalized):
        if i > 0 and message["role"] == "system":
            _invalid(f"messages[{i}]: a system message is allowed only as the first message")
    assistant = [message for message in normalized if message["role"] == "assistant"]
    if not assistant:
        _invalid("no assistant message; there is nothing to train on")
    if all(message.get("weight") == "0" for message in assistant):
        _invalid("every assistant message has weight 0; there is nothing to train on")
    return normalized


def _normalize_message(message: object, index: int) -> dict[str, str]:
    where = f"messages[{index}]"
    if not isinstance(message, dict):
        _invalid(f"{where} must be an object, got {_json_type(message)}")
    _check_keys(message, _MESSAGE_KEYS, where)
    role = _required(message, "role", where)
    if not isinstance(role, str):
        _invalid(f"{where}.role must be a string, got {_json_type(role)}")
    role = _ROLE_ALIASES.get(role, role)
    if role not in _ROLES:
        _invalid(f"{where}: unsupported role {_short(role)}; expected system, user or assistant")
    content = _content_text(_required(message, "content", where), f"{where}.content")
    if "name" in message and not isinstance(message["name"], str):
        _invalid(f"{where}.name must be a string, got {_json_type(message['name'])}")
    normalized = {"role": role, "content": content}
    if "weight" in message:
        normalized["weight"] = _weight(message["weight"], role, where)
    return normalized


def _content_text(content: object, where: str) -> str:
    """Content as one string; OpenAI's list-of-text-parts form is concatenated."""
    if isinstance(content, list):
        content = "".join(_text_part(part, f"{where}[{j}]") for j, part in enumerate(content))
    elif not isinstance(content, str):
        _invalid(f"{where} must be a string or an array of text parts, got {_json_type(content)}")
    return _checked_text(content, where)


def _text_part(part: object, where: str) -> str:
    if not isinstance(part, dict):
        _invalid(f"{where} must be an object, got {_json_type(part)}")
    part_type = _required(part, "type", where)
    if part_type != "text":
        message = f"{where}: unsupported content part type {_short(part_type)}"
        _invalid(f'{message}; only "text" parts are supported')
    _check_keys(part, frozenset({"type", "text"}), where)
    text = _required(part, "text", where)
    if not isinstance(text, str):
        _invalid(f"{where}.text must be a string, got {_json_type(text)}")
    return text


def _weight(weight: object, role: str, where: str) -> str:
    # bool is an int subclass, but JSON true/false is not a valid weight.
    if type(weight) is not int or weight not in (0, 1):
        _invalid(f"{where}.weight must be 0 or 1, got {_short(weight)}")
    if role != "assistant":
        _invalid(f"{where}: weight is allowed only on assistant messages")
    return str(weight)


def _normalize_cot(obj: Mapping[str, object]) -> tuple[dict[str, str], ...]:
    _check_keys(obj, _FORMAT_KEYS["cot"], "the example")
    if "reasoning" in obj and "chain_of_thought" in obj:
        _invalid('give either "reasoning" or "chain_of_thought", not both')
    question = _string_field(obj, "question")
    answer = _string_field(obj, "answer")
    for key in ("reasoning", "chain_of_thought"):
        if key in obj:
            reasoning = _string_field(obj, key)
            answer = f"{reasoning.rstrip()}\n#### {answer.strip()}"
    return ({"role": "user", "content": question}, {"role": "assistant", "content": answer})


def _normalize_prompt_completion(obj: Mapping[str, object]) -> tuple[dict[str, str], ...]:
    _check_keys(obj, _FORMAT_KEYS["prompt_completion"], "the example")
    prompt = _string_field(obj, "prompt")
    completion = _string_field(obj, "completion")
    return ({"role": "user", "content": prompt}, {"role": "assistant", "content": completion})


_NORMALIZERS: dict[DatasetFormat, Callable[[Mapping[str, object]], tuple[dict[str, str], ...]]] = {
    "chat": _normalize_chat,
    "cot": _normalize_cot,
    "prompt_completion": _normalize_prompt_completion,
}


# -- field checks and messages ----------------------------------------------------------------


def _string_field(obj: Mapping[str, object], key: str) -> str:
    value = _required(obj, key, "the example")
    if not isinstance(value, str):
        _invalid(f'"{key}" must be a string, got {_json_type(value)}')
    return _checked_text(value, f'"{key}"')


def _checked_text(text: str, where: str) -> str:
    if not text.strip():
        _invalid(f"{where} is empty")
    match = _CONTROL_CHAR.search(text)
    if match:
        code = ord(match.group())
        _invalid(
            f"{where} contains the control character U+{code:04X} at character {match.start() + 1}"
        )
    return text


def _required(obj: Mapping[str, object], key: str, where: str) -> object:
    if key not in obj:
        _invalid(f"{where} is missing {_short(key)}")
    return obj[key]


def _check_keys(obj: Mapping[str, object], allowed: frozenset[str], where: str) -> None:
    unknown = sorted(key for key in obj if key not in allowed)
    if unknown:
        _invalid(
            f"{where} has unknown key(s) {_quoted(unknown)}; allowed: {_quoted(sorted(allowed))}"
        )


def _keys_phrase(obj: Mapping[str, object]) -> str:
    return f"keys {_quoted(sorted(obj))}" if obj else "no keys"


def _quoted(names: Sequence[str]) -> str:
    shown = [_short(name) for name in names[:_MAX_NAMES_SHOWN]]
    if len(names) > _MAX_NAMES_SHOWN:
        shown.append(f"... ({len(names) - _MAX_NAMES_SHOWN} more)")
    return ", ".join(shown) or "(none)"


def _short(value: object) -> str:
    """A JSON value as it appears in the file, cut short: it lands in a problem message."""
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= _MAX_VALUE_CHARS else text[: _MAX_VALUE_CHARS - 3] + "..."


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"
