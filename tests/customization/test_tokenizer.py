import json
from pathlib import Path

import pytest
from tokenizers import processors

from customization.datasets import Example
from customization.errors import BaseModelNotFoundError, DatasetFormatError
from customization.tokenizer import (
    CHATML_TEMPLATE,
    ChatTokenizer,
    TokenizedExample,
    tokenize_examples,
    truncate_example,
)
from tests.helpers.tiny_models import tiny_tokenizer

MULTI_TURN = (
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "2+2=4\n#### 4"},
    {"role": "user", "content": "And 3+3?"},
    {"role": "assistant", "content": "It is 6."},
)


def _target_spans(tokenizer: ChatTokenizer, example: TokenizedExample) -> list[str]:
    """The decoded text of each maximal run of target tokens."""
    spans: list[list[int]] = []
    previous = 0
    for token, mask in zip(example.input_ids, example.target_mask, strict=True):
        if mask and not previous:
            spans.append([])
        if mask:
            spans[-1].append(token)
        previous = mask
    return [tokenizer.decode(span, skip_special_tokens=False) for span in spans]


def _chat(user: str, assistant: str, line: int) -> Example:
    messages = ({"role": "user", "content": user}, {"role": "assistant", "content": assistant})
    return Example(messages=messages, line=line)


def test_target_mask_covers_exactly_assistant_content_and_end_of_turn(
    tokenizer: ChatTokenizer,
) -> None:
    """Only each assistant turn's content and its <|im_end|> are targets, in every turn."""
    example = tokenizer.encode_chat(MULTI_TURN)
    assert len(example.target_mask) == len(example.input_ids)
    assert _target_spans(tokenizer, example) == ["2+2=4\n#### 4<|im_end|>", "It is 6.<|im_end|>"]
    expected = len(tokenizer.encode("2+2=4\n#### 4")) + len(tokenizer.encode("It is 6.")) + 2
    assert example.n_targets == expected


def test_assistant_turn_with_weight_zero_is_not_a_target(tokenizer: ChatTokenizer) -> None:
    """An assistant turn marked weight 0 stays in the context but trains nothing."""
    messages = [dict(m) for m in MULTI_TURN]
    messages[2]["weight"] = "0"
    example = tokenizer.encode_chat(messages)
    assert _target_spans(tokenizer, example) == ["It is 6.<|im_end|>"]


def test_encode_chat_tokens_equal_encoding_the_rendered_text(tokenizer: ChatTokenizer) -> None:
    """The ids are exactly those of the rendered conversation, with no BOS in front."""
    example = tokenizer.encode_chat(MULTI_TURN)
    text = tokenizer.render(MULTI_TURN, add_generation_prompt=False)
    assert example.input_ids == tokenizer.encode(text)
    assert example.input_ids[0] == tokenizer.tokenizer.token_to_id("<|im_start|>")


def test_no_bos_is_prepended_even_when_the_post_processor_would_add_one() -> None:
    """A tokenizer.json whose post-processor adds a BOS does not get one from encode."""
    chat = tiny_tokenizer()
    chat.tokenizer.post_processor = processors.TemplateProcessing(
        single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", 0)]
    )
    assert chat.tokenizer.encode("hi").ids[0] == 0  # the trap is armed
    assert chat.encode("hi") == chat.tokenizer.encode("hi", add_special_tokens=False).ids
    assert chat.encode_chat(MULTI_TURN).input_ids[0] != 0
    assert chat.encode_prompt(MULTI_TURN[:2])[0] != 0


def test_encode_prompt_ends_with_the_assistant_generation_prompt(
    tokenizer: ChatTokenizer,
) -> None:
    """A prompt is the conversation followed by '<|im_start|>assistant\\n'."""
    ids = tokenizer.encode_prompt(MULTI_TURN[:2])
    text = tokenizer.decode(ids, skip_special_tokens=False)
    assert text.endswith("What is 2+2?<|im_end|>\n<|im_start|>assistant\n")


def test_from_dir_loads_a_save_pretrained_folder(tokenizer: ChatTokenizer, tmp_path: Path) -> None:
    """A folder written by transformers' save_pretrained loads with the same encodings."""
    from transformers import PreTrainedTokenizerFast

    hf_tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer.tokenizer,
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        chat_template=CHATML_TEMPLATE,
    )
    hf_tokenizer.save_pretrained(tmp_path)
    loaded = ChatTokenizer.from_dir(tmp_path)
    assert loaded.eos_token_id == tokenizer.eos_token_id == 2
    assert loaded.pad_token_id == tokenizer.pad_token_id
    assert loaded.vocab_size == tokenizer.vocab_size
    assert loaded.vocab_hash() == tokenizer.vocab_hash()
    assert loaded.encode_chat(MULTI_TURN) == tokenizer.encode_chat(MULTI_TURN)
    assert loaded.encode_prompt(MULTI_TURN[:2]) == tokenizer.encode_prompt(MULTI_TURN[:2])
    # And transformers itself agrees on the rendered prompt's ids.
    rendered = hf_tokenizer.apply_chat_template(list(MULTI_TURN[:2]), add_generation_prompt=True)
    assert loaded.encode_prompt(MULTI_TURN[:2]) == list(rendered)


def test_from_dir_reads_chat_template_from_tokenizer_config(
    tokenizer: ChatTokenizer, tmp_path: Path
) -> None:
    """chat_template and eos_token may live in tokenizer_config.json (older layout)."""
    tokenizer.tokenizer.save(str(tmp_path / "tokenizer.json"))
    template = CHATML_TEMPLATE.replace("\\n", "\n") + "{# custom #}"
    config = {"chat_template": template, "eos_token": {"content": "<|im_end|>"}}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config), "utf-8")
    loaded = ChatTokenizer.from_dir(tmp_path)
    assert loaded.chat_template == template
    assert loaded.eos_token == "<|im_end|>"


def test_from_dir_without_tokenizer_json_raises(tmp_path: Path) -> None:
    """A folder without tokenizer.json is reported as a missing base, not a crash."""
    with pytest.raises(BaseModelNotFoundError, match=r"tokenizer\.json"):
        ChatTokenizer.from_dir(tmp_path)


def test_tokenize_examples_truncates_to_max_length(tokenizer: ChatTokenizer) -> None:
    """Over-long examples keep their first max_length tokens and are marked truncated."""
    examples = [_chat("hi", "a long answer " * 10, line=1), _chat("hi", "ok", line=2)]
    tokenized = tokenize_examples(examples, tokenizer, max_length=40)
    assert len(tokenized[0].input_ids) == 40
    assert tokenized[0].truncated
    assert not tokenized[1].truncated
    full = tokenizer.encode_chat(examples[0].messages)
    assert tokenized[0].input_ids == full.input_ids[:40]
    assert tokenized[0].target_mask == full.target_mask[:40]
    assert [t.line for t in tokenized] == [1, 2]


def test_example_without_assistant_tokens_within_max_length_is_reported_by_line(
    tokenizer: ChatTokenizer,
) -> None:
    """An example whose answer starts after max_length is a DatasetFormatError at its line."""
    examples = [_chat("hi", "ok", line=1), _chat("a long question " * 10, "ok", line=7)]
    with pytest.raises(DatasetFormatError, match="line 7: no assistant tokens") as caught:
        tokenize_examples(examples, tokenizer, max_length=40)
    assert caught.value.lines == [7]


def test_overflow_error_reports_every_over_long_example_by_line(
    tokenizer: ChatTokenizer,
) -> None:
    """overflow='error' refuses over-long examples instead of truncating, naming each line."""
    examples = [
        _chat("hi", "long " * 20, line=2),
        _chat("hi", "ok", line=3),
        _chat("hi", "longer " * 20, line=5),
    ]
    with pytest.raises(DatasetFormatError, match="the limit is 40") as caught:
        tokenize_examples(examples, tokenizer, max_length=40, overflow="error")
    assert caught.value.lines == [2, 5]
    with pytest.raises(ValueError, match="overflow"):
        tokenize_examples(examples, tokenizer, max_length=40, overflow="drop")


def test_truncate_example_keeps_short_examples_unchanged(tokenizer: ChatTokenizer) -> None:
    """An example within max_length is returned as is."""
    example = tokenizer.encode_chat(MULTI_TURN)
    assert truncate_example(example, len(example.input_ids)) is example


def test_stop_token_ids_include_end_of_turn_and_end_of_text(tokenizer: ChatTokenizer) -> None:
    """Replies end at <|im_end|> (the eos) or <|endoftext|>."""
    assert tokenizer.stop_token_ids == (0, 2)


def test_vocab_hash_depends_on_the_chat_template(tokenizer: ChatTokenizer) -> None:
    """Two tokenizers with one vocabulary but different templates are not interchangeable."""
    other = ChatTokenizer(
        tokenizer.tokenizer, chat_template=CHATML_TEMPLATE + " ", eos_token="<|im_end|>"
    )
    assert other.vocab_hash() != tokenizer.vocab_hash()
