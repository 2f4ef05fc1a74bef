"""Chat-template rendering and tokenization with an assistant-only loss mask.

Built on the ``tokenizers`` library and ``jinja2`` alone (no torch, no transformers), so the
web process can count tokens at upload time and the workers tokenize training data with the
very same code. A base's tokenizer folder (``tokenizer.json`` + ``tokenizer_config.json``,
as ``save_pretrained`` writes them) is all it needs.

The loss mask marks the tokens of assistant turns (their content and end-of-turn token):
the model learns to answer and to stop, never to reproduce prompts.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.sandbox
import tokenizers

from customization.datasets import Example
from customization.errors import BaseModelNotFoundError, DatasetFormatError, DatasetProblem

Message = dict[str, str]

# Used when a tokenizer ships no template: ChatML, the template of SmolLM2 and Qwen.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Tokens that end a turn or a text in the common chat formats (ChatML, Llama 3, Llama 2).
_END_TOKENS = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "</s>")


@dataclass(frozen=True)
class TokenizedExample:
    """Token ids with a mask aligned to them: 1 where the token is an assistant target."""

    input_ids: list[int]
    target_mask: list[int]
    line: int = 0
    truncated: bool = False

    @property
    def n_targets(self) -> int:
        return sum(self.target_mask)


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _strftime_now(fmt: str) -> str:
    return datetime.now(UTC).strftime(fmt)


def _compile_template(source: str) -> jinja2.Template:
    # Mirrors what transformers does for chat templates: sandboxed, trimmed blocks.
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.filters["tojson"] = lambda value, indent=None: json.dumps(value, indent=indent)
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(source)


def _token_content(value: Any) -> str | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return str(value["content"])
    return None


class ChatTokenizer:
    """A base model's tokenizer and chat template, without transformers."""

    def __init__(
        self,
        tokenizer: tokenizers.Tokenizer,
        *,
        chat_template: str | None,
        eos_token: str,
        bos_token: str | None = None,
        pad_token: str | None = None,
        add_bos_token: bool = False,
    ):
        self.tokenizer = tokenizer
        self.chat_template = chat_template or CHATML_TEMPLATE
        self._template = _compile_template(self.chat_template)
        self.eos_token = eos_token
        self.bos_token = bos_token
        self.pad_token = pad_token or eos_token
        self.add_bos_token = add_bos_token
        self.eos_token_id = self._require_id(eos_token)
        self.pad_token_id = self._require_id(self.pad_token)
        self.bos_token_id = self.tokenizer.token_to_id(bos_token) if bos_token else None

    def _require_id(self, token: str) -> int:
        token_id = self.tokenizer.token_to_id(token)
        if token_id is None:
            raise BaseModelNotFoundError(f"special token {token!r} is not in the vocabulary")
        return int(token_id)

    @classmethod
    def from_dir(cls, path: str | Path) -> ChatTokenizer:
        """Load from a folder written by ``save_pretrained`` (tokenizer.json required)."""
        folder = Path(path)
        tokenizer_file = folder / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise BaseModelNotFoundError(f"no tokenizer.json in {folder}")
        config_file = folder / "tokenizer_config.json"
        config: dict[str, Any] = (
            json.loads(config_file.read_text("utf-8")) if config_file.is_file() else {}
        )
        template = config.get("chat_template")
        template_file = folder / "chat_template.jinja"
        if template is None and template_file.is_file():
            template = template_file.read_text("utf-8")
        eos = _token_content(config.get("eos_token"))
        if eos is None:
            raise BaseModelNotFoundError(f"{config_file} names no eos_token")
        return cls(
            tokenizers.Tokenizer.from_file(str(tokenizer_file)),
            chat_template=template if isinstance(template, str) else None,
            eos_token=eos,
            bos_token=_token_content(config.get("bos_token")),
            pad_token=_token_content(config.get("pad_token")),
            add_bos_token=bool(config.get("add_bos_token", False)),
        )

    # -- sizes and identity -------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return int(self.tokenizer.get_vocab_size(with_added_tokens=True))

    def vocab_hash(self) -> str:
        """sha256 of the vocabulary and template: two bases share a tokenizer iff equal."""
        vocab = sorted(self.tokenizer.get_vocab(with_added_tokens=True).items())
        digest = hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode("utf-8"))
        digest.update(self.chat_template.encode("utf-8"))
        return digest.hexdigest()

    @property
    def stop_token_ids(self) -> tuple[int, ...]:
        """Token ids that end a reply: the end-of-turn token and the end-of-text token."""
        ids = {self.eos_token_id}
        for token in _END_TOKENS:
            token_id = self.tokenizer.token_to_id(token)
            if token_id is not None:
                ids.add(int(token_id))
        return tuple(sorted(ids))

    # -- text <-> ids -------------------------------------------------------------------

    def render(self, messages: Sequence[Message], *, add_generation_prompt: bool) -> str:
        return str(
            self._template.render(
                messages=[dict(m) for m in messages],
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token or "",
                eos_token=self.eos_token,
            )
        )

    def encode(self, text: str) -> list[int]:
        # Special tokens are written out by the template itself; never let the
        # post-processor add a BOS the model was not trained with.
        ids = list(self.tokenizer.encode(text, add_special_tokens=False).ids)
        if self.add_bos_token and self.bos_token_id is not None:
            ids.insert(0, self.bos_token_id)
        return ids

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        return str(self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens))

    def encode_prompt(self, messages: Sequence[Message]) -> list[int]:
        """Token ids of a conversation followed by the assistant's generation prompt."""
        return self.encode(self.render(messages, add_generation_prompt=True))

    def encode_chat(self, messages: Sequence[Message], *, line: int = 0) -> TokenizedExample:
        """Tokenize a whole conversation, marking assistant turns as targets.

        Each assistant turn's span is found by rendering the conversation up to it with the
        generation prompt (where its content starts) and through it (where its turn ends),
        then mapping those character spans onto token offsets.
        """
        text = self.render(messages, add_generation_prompt=False)
        spans: list[tuple[int, int]] = []
        for index, message in enumerate(messages):
            if message["role"] != "assistant" or message.get("weight") == "0":
                continue
            start = len(self.render(messages[:index], add_generation_prompt=True))
            through = self.render(messages[: index + 1], add_generation_prompt=False)
            if not text.startswith(through):
                raise DatasetFormatError(
                    [DatasetProblem(line, "the chat template does not render turns as prefixes")]
                )
            spans.append((start, self._turn_end(through)))
        encoding = self.tokenizer.encode(text, add_special_tokens=False)
        ids = list(encoding.ids)
        mask = [0] * len(ids)
        for position, (char_start, char_end) in enumerate(encoding.offsets):
            if char_end <= char_start:
                continue
            if any(start <= char_start < end for start, end in spans):
                mask[position] = 1
        if self.add_bos_token and self.bos_token_id is not None:
            ids.insert(0, self.bos_token_id)
            mask.insert(0, 0)
        return TokenizedExample(ids, mask, line=line)

    def _turn_end(self, through: str) -> int:
        """Where a turn rendered as ``through`` ends: after its end-of-turn token.

        Whitespace a template writes after that token (ChatML's newline) separates turns;
        it is not part of the reply, and generation stops before it.
        """
        content = through.rstrip()
        ends_with_stop = any(content.endswith(token) for token in (self.eos_token, *_END_TOKENS))
        return len(content) if ends_with_stop else len(through)


def truncate_example(example: TokenizedExample, max_length: int) -> TokenizedExample:
    """Keep the first ``max_length`` tokens (prompt first, so the answer's start survives)."""
    if len(example.input_ids) <= max_length:
        return example
    return TokenizedExample(
        example.input_ids[:max_length],
        example.target_mask[:max_length],
        line=example.line,
        truncated=True,
    )


def tokenize_examples(
    examples: Sequence[Example],
    tokenizer: ChatTokenizer,
    *,
    max_length: int,
    overflow: str = "truncate",
) -> list[TokenizedExample]:
    """Tokenize examples; over-long ones are truncated or (``overflow="error"``) reported.

    An example left without any assistant token after truncation is always an error: it
    would train nothing and silently shrink the dataset.
    """
    if overflow not in ("truncate", "error"):
        raise ValueError(f"overflow must be 'truncate' or 'error', got {overflow!r}")
    tokenized: list[TokenizedExample] = []
    problems: list[DatasetProblem] = []
    for example in examples:
        full = tokenizer.encode_chat(example.messages, line=example.line)
        if len(full.input_ids) > max_length and overflow == "error":
            problems.append(
                DatasetProblem(
                    example.line,
                    f"example is {len(full.input_ids)} tokens long; the limit is {max_length}",
                )
            )
            continue
        cut = truncate_example(full, max_length)
        if cut.n_targets == 0:
            problems.append(
                DatasetProblem(
                    example.line,
                    f"no assistant tokens within the first {max_length} tokens "
                    f"(example is {len(full.input_ids)} tokens long)",
                )
            )
            continue
        tokenized.append(cut)
    if problems:
        raise DatasetFormatError(problems)
    return tokenized
