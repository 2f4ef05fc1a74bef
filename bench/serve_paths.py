"""The decoding paths the serving benchmark times, side by side on one base."""

from __future__ import annotations

import argparse
import functools
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from bench.common import Problems, run_together
from bench.lora import load_hf_model, lora_config
from customization.base_model import FrozenBase, load_base_model
from customization.checkpoint import load_carry_on, save_carry_on
from customization.config import CarryOnConfig, GenerationConfig
from customization.datasets import load_dataset
from customization.serving import AdapterRef, ServingEngine
from customization.training import build_carry_on

BASE_NAME = "base"


@dataclass(frozen=True)
class Timing:
    tokens: int
    ttft: float  # seconds until the first generated token
    seconds: float


class _FirstToken:
    """A transformers streamer that only notes when the first new token arrives."""

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.first: float | None = None
        self._puts = 0

    def put(self, value: Any) -> None:
        self._puts += 1  # the first put is the prompt itself
        if self._puts == 2 and self.first is None:
            self.first = time.perf_counter()

    def end(self) -> None:
        pass


def _trained_like(base: FrozenBase, seed: int) -> Any:
    """A default-size carry-on with every weight moved off its init, so it changes outputs."""
    config = CarryOnConfig()
    carry_on = build_carry_on(config, width=base.hidden_size, seed=seed)
    with torch.no_grad():
        for parameter in carry_on.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.02)
    return carry_on.eval()


def _peft_with_adapters(base_dir: Path, targets: str, count: int, seed: int) -> Any:
    """A PeftModel holding ``count`` LoRA adapters a0.., each with non-zero B (trained-like)."""
    from peft import get_peft_model

    torch.manual_seed(seed)
    model = get_peft_model(load_hf_model(base_dir), lora_config(targets), adapter_name="a0")
    for index in range(1, count):
        model.add_adapter(f"a{index}", lora_config(targets))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.02)
    return model.eval()


@dataclass
class Bench:
    base: FrozenBase
    engine: ServingEngine
    prompts: list[list[int]]
    mixed_prompts: list[list[int]]
    refs: list[AdapterRef]
    peft: dict[str, Any]
    # transformers' generate on a model of its own: the engine's base runs some of its
    # matmuls on prepacked kernels (customization.kernels), the peer as transformers ships it.
    hf: Any
    lora_dir: Path
    carry_on_config: dict[str, Any]
    # A `balanced` preset tail (issue 13's decoding line), written by the caller.
    balanced_ref: AdapterRef | None = None
    _cold: list[str] = field(default_factory=list)

    @classmethod
    def build(
        cls, base_dir: Path, problems: Problems, args: argparse.Namespace, work: Path
    ) -> Bench:
        base = load_base_model(base_dir)
        engine = ServingEngine(lambda _: base, max_batch_size=max(8, args.adapters))
        questions = [e.messages[0]["content"] for e in load_dataset(problems.held_out)]
        encoded = [
            base.tokenizer.encode_prompt([{"role": "user", "content": q}]) for q in questions
        ]
        refs = []
        for index in range(args.adapters):
            carry_on = _trained_like(base, seed=index)
            info = save_carry_on(
                carry_on, work / f"carry-on-{index}", base_fingerprints=[base.fingerprint()]
            )
            refs.append(AdapterRef(adapter_id=f"a{index}", path=info.path, sha256=info.sha256))
        peft = {
            "lora-qv": _peft_with_adapters(base_dir, "lora-qv", args.adapters, seed=0),
            "lora-all": _peft_with_adapters(base_dir, "lora-all", 1, seed=0),
        }
        lora_dir = work / "lora-qv"
        peft["lora-qv"].save_pretrained(lora_dir, selected_adapters=["a0"])
        return cls(
            base=base,
            engine=engine,
            prompts=encoded[: args.prompts],
            mixed_prompts=encoded[: args.adapters],
            refs=refs,
            peft=peft,
            hf=load_hf_model(base_dir).eval(),
            lora_dir=lora_dir / "a0" if (lora_dir / "a0").is_dir() else lora_dir,
            carry_on_config=carry_on.config.to_dict(),
        )

    def close(self) -> None:
        self.engine.shutdown()

    # -- batch 1 ---------------------------------------------------------------------------

    def _hf(self, model: Any, prompt: list[int], new_tokens: int, **kwargs: Any) -> Timing:
        streamer = _FirstToken()
        ids = torch.tensor([prompt])
        with torch.inference_mode():
            out = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                do_sample=False,
                max_new_tokens=new_tokens,
                pad_token_id=self.base.tokenizer.pad_token_id,
                streamer=streamer,
                **kwargs,
            )
        seconds = time.perf_counter() - streamer.started
        tokens = self._count(out[0, len(prompt) :].tolist())
        return Timing(tokens, (streamer.first or time.perf_counter()) - streamer.started, seconds)

    def _count(self, generated: list[int]) -> int:
        """Tokens up to the first stop token, as the engine counts them."""
        stops = set(self.base.tokenizer.stop_token_ids)
        return next((i for i, t in enumerate(generated) if t in stops), len(generated))

    def hf_base(self, prompt: list[int], new_tokens: int) -> Timing:
        return self._hf(self.hf, prompt, new_tokens)

    def peft_qv(self, prompt: list[int], new_tokens: int) -> Timing:
        self.peft["lora-qv"].set_adapter("a0")
        return self._hf(self.peft["lora-qv"], prompt, new_tokens)

    def peft_all(self, prompt: list[int], new_tokens: int) -> Timing:
        return self._hf(self.peft["lora-all"], prompt, new_tokens)

    def _engine(self, prompt: list[int], new_tokens: int, ref: AdapterRef | None) -> Timing:
        config = GenerationConfig(temperature=0.0, max_new_tokens=new_tokens)
        started = time.perf_counter()
        completion = self.engine.submit(BASE_NAME, prompt, config, adapter=ref)
        first = None
        for _ in completion.events():
            first = first or time.perf_counter()
        seconds = time.perf_counter() - started
        return Timing(completion.completion_tokens, (first or started) - started, seconds)

    def engine_base(self, prompt: list[int], new_tokens: int) -> Timing:
        return self._engine(prompt, new_tokens, None)

    def engine_carry_on(self, prompt: list[int], new_tokens: int) -> Timing:
        return self._engine(prompt, new_tokens, self.refs[0])

    def engine_balanced(self, prompt: list[int], new_tokens: int) -> Timing:
        assert self.balanced_ref is not None, "write a balanced tail first"
        return self._engine(prompt, new_tokens, self.balanced_ref)

    # -- several adapters at once -------------------------------------------------------------

    def engine_concurrent(self, new_tokens: int) -> tuple[int, float]:
        """One request per adapter, all submitted at once from their own threads."""
        prompts = self.mixed_prompts
        timings, seconds = run_together(
            [
                functools.partial(self._engine, prompts[i % len(prompts)], new_tokens, ref)
                for i, ref in enumerate(self.refs)
            ]
        )
        return sum(t.tokens for t in timings), seconds

    def engine_sequential(self, new_tokens: int) -> tuple[int, float]:
        started = time.perf_counter()
        tokens = 0
        for index, ref in enumerate(self.refs):
            prompt = self.mixed_prompts[index % len(self.mixed_prompts)]
            tokens += self._engine(prompt, new_tokens, ref).tokens
        return tokens, time.perf_counter() - started

    def peft_mixed(self, new_tokens: int) -> tuple[int, float]:
        """PEFT's mixed-adapter batch: one left-padded generate with ``adapter_names``."""
        prompts = [self.mixed_prompts[i % len(self.mixed_prompts)] for i in range(len(self.refs))]
        width = max(len(p) for p in prompts)
        pad = self.base.tokenizer.pad_token_id
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        started = time.perf_counter()
        with torch.inference_mode():
            out = self.peft["lora-qv"].generate(
                input_ids=ids,
                attention_mask=mask,
                adapter_names=[f"a{i}" for i in range(len(prompts))],
                do_sample=False,
                max_new_tokens=new_tokens,
                pad_token_id=pad,
            )
        seconds = time.perf_counter() - started
        return sum(self._count(row[width:].tolist()) for row in out), seconds

    def peft_sequential(self, new_tokens: int) -> tuple[int, float]:
        started = time.perf_counter()
        tokens = 0
        for index in range(len(self.refs)):
            self.peft["lora-qv"].set_adapter(f"a{index}")
            prompt = self.mixed_prompts[index % len(self.mixed_prompts)]
            tokens += self._hf(self.peft["lora-qv"], prompt, new_tokens).tokens
        return tokens, time.perf_counter() - started

    # -- cold loads ------------------------------------------------------------------------------

    def cold_load_carry_on(self) -> float:
        """What the adapter cache does on a miss: verify the sha256 and fingerprint, load."""
        ref = self.refs[0]
        started = time.perf_counter()
        load_carry_on(
            ref.path, base_fingerprints=[self.base.fingerprint()], expected_sha256=ref.sha256
        )
        return time.perf_counter() - started

    def cold_load_lora(self, index: int) -> float:
        model = self.peft["lora-qv"]
        name = f"cold{index}"
        started = time.perf_counter()
        model.load_adapter(self.lora_dir, adapter_name=name)
        seconds = time.perf_counter() - started
        model.delete_adapter(name)
        return seconds
