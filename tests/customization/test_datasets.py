import json
import random
from pathlib import Path

import pytest

from customization.datasets import (
    WHOLE_FILE,
    DatasetLimits,
    Example,
    dataset_sha256,
    load_dataset,
    parse_dataset,
    read_dataset_file,
    split_examples,
)
from customization.errors import DatasetFormatError


def _line(obj: object) -> bytes:
    return json.dumps(obj).encode()


def _chat(*turns: tuple[str, object], **extra: object) -> bytes:
    return _line({"messages": [{"role": r, "content": c} for r, c in turns], **extra})


def _jsonl(*lines: bytes) -> bytes:
    return b"".join(line + b"\n" for line in lines)


GOOD = _chat(("user", "What is 2+2?"), ("assistant", "4"))
GOOD_COT = _line({"question": "What is 2+2?", "answer": "2+2=<<2+2=4>>4\n#### 4"})
GOOD_PC = _line({"prompt": "Say hi", "completion": "hi"})


def _bad_at_3(bad: bytes, good: bytes = GOOD) -> bytes:
    """A four-line file whose third line is ``bad``."""
    return _jsonl(good, good, bad, good)


def _msg(**fields: object) -> bytes:
    """A chat line whose second message is replaced by ``fields``."""
    return _line({"messages": [{"role": "user", "content": "hi"}, fields]})


MALFORMED = [
    pytest.param(_bad_at_3(b'{"messages": ['), {}, 3, "invalid JSON at column", id="bad-json"),
    pytest.param(_bad_at_3(b"[1, 2]"), {}, 3, "expected a JSON object", id="not-object"),
    pytest.param(_bad_at_3(b'"just text"'), {}, 3, "got a string", id="bare-string"),
    pytest.param(_bad_at_3(b'{"messages": "\xff"}'), {}, 3, "invalid UTF-8", id="bad-utf8"),
    pytest.param(_bad_at_3(b'{"messages": \x00}'), {}, 3, "NUL", id="nul-byte"),
    pytest.param(_bad_at_3(b"[" * 50 + b"]" * 50), {}, 3, "nested deeper", id="deep-nesting"),
    pytest.param(_bad_at_3(b"[" * 200_000), {}, 3, "nested deeper", id="very-deep-nesting"),
    pytest.param(_bad_at_3(b'{"messages": NaN}'), {}, 3, "NaN", id="nan-constant"),
    pytest.param(_bad_at_3(b'{"messages": [], "messages": []}'), {}, 3, "duplicate", id="dup-key"),
    pytest.param(_bad_at_3(b'{"text": "hello"}'), {}, 3, "unrecognized example", id="no-format"),
    pytest.param(_bad_at_3(b"{}"), {}, 3, "no keys", id="empty-object"),
    pytest.param(_bad_at_3(_line({"messages": "hi"})), {}, 3, "must be an array", id="msgs-str"),
    pytest.param(_bad_at_3(_line({"messages": []})), {}, 3, '"messages" is empty', id="no-msgs"),
    pytest.param(_bad_at_3(_line({"messages": ["hi"]})), {}, 3, "must be an object", id="msg-str"),
    pytest.param(_bad_at_3(_msg(role="assistant", content=4)), {}, 3, "a number", id="num-content"),
    pytest.param(_bad_at_3(_msg(role="assistant")), {}, 3, 'missing "content"', id="no-content"),
    pytest.param(_bad_at_3(_msg(content="x")), {}, 3, 'missing "role"', id="no-role"),
    pytest.param(
        _bad_at_3(_msg(role=1, content="x")), {}, 3, "role must be a string", id="role-num"
    ),
    pytest.param(_bad_at_3(_msg(role="tool", content="x")), {}, 3, '"tool"', id="tool-role"),
    pytest.param(_bad_at_3(_msg(role="wizard", content="x")), {}, 3, '"wizard"', id="odd-role"),
    pytest.param(
        _bad_at_3(_chat(("user", "hi"))), {}, 3, "no assistant message", id="no-assistant"
    ),
    pytest.param(_bad_at_3(_msg(role="assistant", content="")), {}, 3, "is empty", id="empty"),
    pytest.param(_bad_at_3(_msg(role="assistant", content=" \n")), {}, 3, "is empty", id="blank"),
    pytest.param(
        _bad_at_3(_msg(role="assistant", content="a\u0007b")), {}, 3, "U+0007", id="control-char"
    ),
    pytest.param(
        _bad_at_3(_chat(("user", "hi"), ("assistant", "x"), ("system", "late"))),
        {},
        3,
        "only as the first message",
        id="late-system",
    ),
    pytest.param(_bad_at_3(_chat(("assistant", "x"), foo=1)), {}, 3, '"foo"', id="unknown-key"),
    pytest.param(
        _bad_at_3(_msg(role="assistant", content="x", tool_calls=[])),
        {},
        3,
        '"tool_calls"',
        id="unknown-message-key",
    ),
    pytest.param(
        _bad_at_3(_msg(role="assistant", content="x", weight=2)), {}, 3, "0 or 1", id="weight-2"
    ),
    pytest.param(
        _bad_at_3(_msg(role="assistant", content="x", weight=True)), {}, 3, "0 or 1", id="weight-b"
    ),
    pytest.param(
        _bad_at_3(_line({"messages": [{"role": "user", "content": "q", "weight": 1}]})),
        {},
        3,
        "only on assistant messages",
        id="weight-on-user",
    ),
    pytest.param(
        _bad_at_3(_msg(role="assistant", content="x", weight=0)),
        {},
        3,
        "weight 0",
        id="nothing-to-train",
    ),
    pytest.param(
        _bad_at_3(_msg(role="assistant", content=[{"type": "image_url", "image_url": {}}])),
        {},
        3,
        '"image_url"',
        id="image-part",
    ),
    pytest.param(
        _bad_at_3(_msg(role="assistant", content=None)), {}, 3, "got null", id="null-content"
    ),
    pytest.param(_bad_at_3(GOOD_COT), {}, 3, "cot format but the file is", id="mixed-format"),
    pytest.param(
        _bad_at_3(_line({"question": "q"}), good=GOOD_COT), {}, 3, '"answer"', id="cot-no-answer"
    ),
    pytest.param(
        _bad_at_3(_line({"question": "q", "answer": 4}), good=GOOD_COT),
        {},
        3,
        "must be a string",
        id="cot-numeric-answer",
    ),
    pytest.param(
        _bad_at_3(
            _line({"question": "q", "reasoning": "r", "chain_of_thought": "c", "answer": "1"}),
            good=GOOD_COT,
        ),
        {},
        3,
        "not both",
        id="cot-two-reasonings",
    ),
    pytest.param(
        _bad_at_3(_line({"prompt": "p", "completion": ""}), good=GOOD_PC),
        {},
        3,
        '"completion" is empty',
        id="pc-empty-completion",
    ),
    pytest.param(
        _bad_at_3(_chat(("user", "hi"), ("assistant", "x" * 300))),
        {"max_line_bytes": 200},
        3,
        "the limit is 200",
        id="long-line",
    ),
    pytest.param(
        _bad_at_3(_chat(("user", "hi"), ("assistant", "x" * 300))),
        {"max_chars_per_example": 100},
        3,
        "characters; the limit is 100",
        id="long-example",
    ),
    pytest.param(_jsonl(GOOD, GOOD, GOOD, GOOD), {"max_lines": 2}, 3, "lines", id="too-many-lines"),
    pytest.param(
        _jsonl(GOOD, GOOD, GOOD, GOOD), {"max_bytes": 2 * len(GOOD) + 5}, 3, "bytes", id="too-big"
    ),
    pytest.param(b"", {}, WHOLE_FILE, "empty", id="empty-file"),
    pytest.param(b"\n  \n\r\n", {}, WHOLE_FILE, "empty", id="blank-file"),
    pytest.param(
        _jsonl(GOOD, GOOD), {"min_examples": 3}, WHOLE_FILE, "at least 3", id="too-few-examples"
    ),
    pytest.param(b"\xff\xfe{\x00}\x00", {}, WHOLE_FILE, "UTF-16", id="utf16"),
    pytest.param(
        _bad_at_3(b'{"messages": [{"role": "user", "content": "\\ud800"}]}'),
        {},
        3,
        "unpaired surrogate",
        id="lone-surrogate",
    ),
]


@pytest.mark.parametrize(("data", "limits", "line", "fragment"), MALFORMED)
def test_load_dataset_rejects_malformed_input_naming_the_line(
    data: bytes, limits: dict[str, int], line: int, fragment: str
) -> None:
    """A malformed dataset raises DatasetFormatError whose first problem names its line."""
    with pytest.raises(DatasetFormatError) as excinfo:
        load_dataset(data, limits=DatasetLimits(**limits))
    first = excinfo.value.problems[0]
    assert first.line == line
    assert fragment in first.message
    assert f"line {line}" in str(excinfo.value)


def test_parse_dataset_never_raises_on_random_bytes() -> None:
    """Random bytes give a report with problems, never an exception."""
    rng = random.Random(0)
    for _ in range(20):
        report = parse_dataset(rng.randbytes(2_000)).report
        assert not report.ok


def test_chat_format_is_detected_and_normalized() -> None:
    """Chat lines normalize roles, text parts and weights; names and tools are dropped."""
    data = _line(
        {
            "messages": [
                {"role": "developer", "content": "Be brief."},
                {
                    "role": "user",
                    "name": "ann",
                    "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}],
                },
                {"role": "assistant", "content": "Draft", "weight": 0},
                {"role": "assistant", "content": "Hello!", "weight": 1},
            ],
            "tools": [],
            "metadata": {"source": "test"},
        }
    )
    parsed = parse_dataset(data)
    assert parsed.report.format == "chat"
    assert parsed.examples == [
        Example(
            messages=(
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Hi there"},
                {"role": "assistant", "content": "Draft", "weight": "0"},
                {"role": "assistant", "content": "Hello!", "weight": "1"},
            ),
            line=1,
        )
    ]


def test_cot_format_is_detected_and_normalized() -> None:
    """A GSM8K-style question/answer becomes a user turn and an assistant turn."""
    parsed = parse_dataset(_jsonl(GOOD_COT))
    assert parsed.report.format == "cot"
    assert parsed.examples[0].messages == (
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "2+2=<<2+2=4>>4\n#### 4"},
    )


@pytest.mark.parametrize("key", ["reasoning", "chain_of_thought"])
def test_cot_reasoning_is_joined_to_the_answer_with_a_marker(key: str) -> None:
    """Separate reasoning becomes ``reasoning + "\\n#### " + answer``."""
    data = _line({"question": "2+2?", key: "Two and two make four.\n", "answer": "4"})
    (example,) = load_dataset(data)
    assert example.messages[1] == {
        "role": "assistant",
        "content": "Two and two make four.\n#### 4",
    }


def test_prompt_completion_format_is_detected_and_normalized() -> None:
    """A prompt/completion pair becomes a user turn and an assistant turn."""
    parsed = parse_dataset(_jsonl(GOOD_PC, GOOD_PC))
    assert parsed.report.format == "prompt_completion"
    assert parsed.report.n_examples == 2
    assert parsed.examples[1].messages == (
        {"role": "user", "content": "Say hi"},
        {"role": "assistant", "content": "hi"},
    )


def test_bom_crlf_and_blank_lines_are_accepted_with_editor_line_numbers() -> None:
    """A BOM, CRLF endings and blank lines are fine; lines are numbered as an editor does."""
    data = b"\xef\xbb\xbf" + GOOD + b"\r\n\r\n   \r\n" + GOOD + b"\r\n\r\n" + GOOD
    parsed = parse_dataset(data)
    assert parsed.report.ok
    assert parsed.report.n_lines == 6
    assert [example.line for example in parsed.examples] == [1, 4, 6]


def test_problem_line_numbers_count_blank_lines_and_crlf() -> None:
    """A bad line after blank CRLF lines is reported at its editor line number."""
    data = b"\xef\xbb\xbf" + GOOD + b"\r\n\r\n{oops}\r\n"
    with pytest.raises(DatasetFormatError) as excinfo:
        load_dataset(data)
    assert excinfo.value.lines == [3]


def test_mixed_formats_are_flagged_on_each_odd_line() -> None:
    """Every line in another format than the first example's is a problem naming both."""
    report = parse_dataset(_jsonl(GOOD_PC, GOOD, GOOD_PC, GOOD_COT)).report
    assert report.format == "prompt_completion"
    assert [problem.line for problem in report.problems] == [2, 4]
    assert "detected on line 1" in report.problems[0].message


def test_brackets_inside_strings_do_not_count_as_nesting() -> None:
    """Brackets in string content are text, not JSON nesting."""
    (example,) = load_dataset(_chat(("user", "[" * 100), ("assistant", '{"a": "\\"}' * 30)))
    assert example.messages[0]["content"] == "[" * 100


def test_snippet_escapes_control_characters_and_is_short() -> None:
    """A problem's snippet is the line's start with control characters escaped."""
    report = parse_dataset(b"\x1b[31m" + b"x" * 200 + b"\n").report
    snippet = report.problems[0].snippet
    assert snippet.startswith("\\x1b[31mxxx")
    assert snippet.endswith("...")
    assert len(snippet) < 100


def test_problems_are_capped_with_a_final_note() -> None:
    """After max_problems line problems, one final problem says how many were left out."""
    report = parse_dataset(_jsonl(*[b"{bad"] * 10), max_problems=3).report
    assert [problem.line for problem in report.problems] == [1, 2, 3, WHOLE_FILE, WHOLE_FILE]
    assert report.problems[-1].message.startswith("too many problems; showing the first 3")
    assert "7 more" in report.problems[-1].message


def test_report_counts_lines_and_valid_examples() -> None:
    """n_lines counts physical lines; n_examples counts only valid examples."""
    report = parse_dataset(_jsonl(GOOD, b"", b"{bad", GOOD)).report
    assert (report.n_lines, report.n_examples, report.ok) == (4, 2, False)


def test_report_to_dict_is_json_serializable() -> None:
    """The report round-trips through JSON with its problems."""
    report = parse_dataset(_bad_at_3(b"[1]")).report
    restored = json.loads(json.dumps(report.to_dict()))
    assert restored["format"] == "chat"
    assert restored["ok"] is False
    assert restored["problems"][0]["line"] == 3
    assert restored["problems"][0]["snippet"] == "[1]"


def test_read_dataset_file_reads_a_file(tmp_path: Path) -> None:
    """A file on disk loads like its bytes."""
    path = tmp_path / "train.jsonl"
    path.write_bytes(_jsonl(GOOD, GOOD))
    assert read_dataset_file(path) == load_dataset(_jsonl(GOOD, GOOD))


def test_read_dataset_file_reports_an_oversized_file_at_the_crossing_line(tmp_path: Path) -> None:
    """An oversized file is refused at the first line past the byte limit."""
    path = tmp_path / "big.jsonl"
    path.write_bytes(_jsonl(*[GOOD] * 100))
    limits = DatasetLimits(max_bytes=len(GOOD) * 3 + 10)
    with pytest.raises(DatasetFormatError) as excinfo:
        read_dataset_file(path, limits=limits)
    assert excinfo.value.lines[0] == 4


@pytest.mark.parametrize(
    "kwargs",
    [{"max_bytes": 0}, {"max_lines": -1}, {"min_examples": 0}, {"max_nesting_depth": 10_000}],
)
def test_limits_reject_out_of_range_values(kwargs: dict[str, int]) -> None:
    """DatasetLimits refuses values outside their range, naming the field."""
    (name,) = kwargs
    with pytest.raises(ValueError, match=name):
        DatasetLimits(**kwargs)


def _examples(n: int) -> list[Example]:
    return [Example(({"role": "user", "content": str(i)},), line=i + 1) for i in range(n)]


def test_split_is_deterministic_for_a_seed() -> None:
    """The same seed gives the same split; another seed gives another."""
    examples = _examples(100)
    first = split_examples(examples, valid_fraction=0.2, seed=7)
    assert split_examples(examples, valid_fraction=0.2, seed=7) == first
    assert split_examples(examples, valid_fraction=0.2, seed=8) != first


def test_split_partitions_the_examples_in_file_order() -> None:
    """Train and valid are disjoint, cover every example and keep file order."""
    examples = _examples(50)
    train, valid = split_examples(examples, valid_fraction=0.1, seed=0)
    assert len(valid) == 5
    assert sorted([*train, *valid], key=lambda ex: ex.line) == examples
    assert train == sorted(train, key=lambda ex: ex.line)
    assert valid == sorted(valid, key=lambda ex: ex.line)


@pytest.mark.parametrize(
    ("n", "fraction", "max_valid", "expected_valid"),
    [
        (10, 0.0, None, 0),
        (1, 0.5, None, 0),
        (2, 0.9, None, 1),
        (3, 0.01, None, 1),
        (100, 0.5, 7, 7),
    ],
)
def test_split_sizes_keep_at_least_one_training_example(
    n: int, fraction: float, max_valid: int | None, expected_valid: int
) -> None:
    """Valid is empty only at fraction 0 or a single example; train is never empty."""
    train, valid = split_examples(
        _examples(n), valid_fraction=fraction, seed=1, max_valid=max_valid
    )
    assert len(valid) == expected_valid
    assert len(train) == n - expected_valid


@pytest.mark.parametrize("fraction", [-0.1, 1.0, float("nan")])
def test_split_rejects_fractions_outside_zero_to_one(fraction: float) -> None:
    """valid_fraction must lie in [0, 1)."""
    with pytest.raises(ValueError, match="valid_fraction"):
        split_examples(_examples(5), valid_fraction=fraction, seed=0)


def test_dataset_sha256_hashes_the_raw_bytes() -> None:
    """The digest is the sha256 of the exact upload."""
    empty = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    assert dataset_sha256(b"") == empty
    assert dataset_sha256(GOOD) != dataset_sha256(GOOD + b"\n")
