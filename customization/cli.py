"""Command line for the carry-on core, usable without the web app.

python -m customization prepare-base              # convert the bundled SmolLM2 once
python -m customization demo-data out.jsonl -n 500
python -m customization train data.jsonl --out runs/my-carry-on
python -m customization chat --adapter runs/my-carry-on "What is 12*7?"
python -m customization eval data.jsonl --adapter runs/my-carry-on
python -m customization demo                      # the headless demo (--task booking)
python -m customization demo --task arithmetic     # another demo task
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

DEFAULT_DATA_DIR = Path(os.environ.get("CARRY_ON_DATA_DIR", "data"))


def _models_dir(args: argparse.Namespace) -> Path:
    return Path(
        args.models_dir or os.environ.get("CARRY_ON_MODELS_DIR") or DEFAULT_DATA_DIR / "base_models"
    )


def _setup_torch(args: argparse.Namespace) -> None:
    """The process runtime every model command shares: torch threads, and ``--device``
    resolved once ("auto": CUDA when present)."""
    from customization.runtime import resolve_device, set_up_torch

    set_up_torch(args.threads)
    args.device = resolve_device(args.device)


def _load_base(args: argparse.Namespace) -> Any:
    from customization.base_model import load_base_model, prepare_bundled_base

    source = args.base or prepare_bundled_base(_models_dir(args))
    return load_base_model(source, device=args.device)


def cmd_prepare_base(args: argparse.Namespace) -> int:
    from customization.base_model import prepare_bundled_base

    print(prepare_bundled_base(_models_dir(args)))
    return 0


def cmd_demo_data(args: argparse.Namespace) -> int:
    from customization.demo_data import write_demo_dataset

    print(write_demo_dataset(args.out, args.n, seed=args.seed))
    return 0


def _carry_on_config(args: argparse.Namespace, num_layers: int) -> Any:
    """The adapter asked for: a tail with --tail-depth, else a carry-on; without --taps,
    the carry-on's default ladder for this base's depth."""
    from customization.config import CarryOnConfig, TailConfig, default_taps

    if args.tail_depth:
        return TailConfig(depth=min(args.tail_depth, num_layers), rank=args.rank)
    return CarryOnConfig(
        d_model=args.d_model,
        n_blocks=args.blocks,
        n_heads=args.heads,
        taps=tuple(args.taps) if args.taps else default_taps(num_layers),
        tap_mode=args.tap_mode,
    )


def cmd_train(args: argparse.Namespace) -> int:
    from customization.config import TrainingConfig

    _setup_torch(args)
    base = _load_base(args)
    from customization.pipeline import train_pipeline

    summary = train_pipeline(
        base,
        Path(args.data).read_bytes(),
        carry_on_config=_carry_on_config(args, base.num_layers),
        training_config=TrainingConfig(
            epochs=args.epochs,
            batch_size=args.batch_size,
            learning_rate=args.lr,
            seed=args.seed,
            early_stopping_patience=args.patience,
        ),
        max_length=args.max_length,
        storage_dtype=args.storage_dtype,
        cache_dir=Path(args.cache_dir),
        out=Path(args.out),
        valid_fraction=args.valid_fraction,
    )
    summary.pop("valid_examples")
    print(json.dumps(summary, indent=2))
    return 0


def _load_adapter(args: argparse.Namespace, base: Any) -> Any:
    if not args.adapter:
        return None
    from customization.checkpoint import load_adapter

    return load_adapter(args.adapter, base_fingerprints=[base.fingerprint()], device=args.device)


def cmd_chat(args: argparse.Namespace) -> int:
    from customization.config import GenerationConfig
    from customization.generation import stream

    _setup_torch(args)
    base = _load_base(args)
    carry_on = _load_adapter(args, base)
    config = GenerationConfig(
        temperature=args.temperature,
        top_p=args.top_p,
        max_new_tokens=args.max_tokens,
        seed=args.seed,
    )
    prompts = [args.prompt] if args.prompt else (line.rstrip("\n") for line in sys.stdin)
    for prompt in prompts:
        ids = base.tokenizer.encode_prompt([{"role": "user", "content": prompt}])
        for output in stream(base, ids, config, carry_on):
            print(output.text_delta, end="", flush=True)
        print()
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from customization.datasets import load_dataset
    from customization.evaluation import evaluate_models

    _setup_torch(args)
    base = _load_base(args)
    carry_on = _load_adapter(args, base)
    examples = load_dataset(Path(args.data).read_bytes())[: args.limit]
    report = evaluate_models(
        base,
        [carry_on],
        examples,
        max_length=args.max_length,
        exact_match_problems=args.exact_match,
        max_new_tokens=args.max_tokens,
    )
    scores = report.scores[0]
    output: dict[str, Any] = {"loss": scores.loss, "token_accuracy": scores.token_accuracy}
    if args.exact_match:
        # null when no problem in the file has a checkable "#### N" answer
        output["exact_match"] = scores.exact_match
        output["exact_match_problems"] = len(report.problems)
    print(json.dumps(output, indent=2))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from customization.demo import run_demo

    _setup_torch(args)
    return run_demo(
        models_dir=_models_dir(args),
        work_dir=Path(args.work_dir),
        task=args.task,
        n_problems=args.n,
        n_held_out=args.held_out,
        epochs=args.epochs,
        device=args.device,
    )


def build_parser() -> argparse.ArgumentParser:
    from customization.config import CarryOnConfig, FeatureConfig, TailConfig, TrainingConfig

    parser = argparse.ArgumentParser(
        prog="python -m customization", description=__doc__.split("\n")[0]
    )
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--base", help="HF folder, .gguf file or hub id (default: bundled SmolLM2)")
    common.add_argument("--models-dir", help="where the bundled base is prepared")
    common.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, auto, ...")
    common.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    sub = parser.add_subparsers(dest="command", required=True)

    sub.add_parser(
        "prepare-base", parents=[common], help="convert the bundled base once"
    ).set_defaults(func=cmd_prepare_base)

    demo_data = sub.add_parser("demo-data", help="write generated arithmetic word problems")
    demo_data.add_argument("out")
    demo_data.add_argument("-n", type=int, default=500)
    demo_data.add_argument("--seed", type=int, default=0)
    demo_data.set_defaults(func=cmd_demo_data)

    train = sub.add_parser("train", parents=[common], help="train a carry-on on a JSONL dataset")
    train.add_argument("data")
    train.add_argument("--out", required=True, help="run folder (adapter/ and checkpoints/)")
    train.add_argument("--cache-dir", default=str(DEFAULT_DATA_DIR / "features"))
    # The defaults are the config dataclasses' own, so the CLI never drifts from them.
    shape, schedule, features = CarryOnConfig(), TrainingConfig(), FeatureConfig()
    train.add_argument("--epochs", type=int, default=schedule.epochs)
    train.add_argument("--batch-size", type=int, default=schedule.batch_size)
    train.add_argument("--lr", type=float, default=schedule.learning_rate)
    train.add_argument("--patience", type=int, default=schedule.early_stopping_patience)
    train.add_argument("--seed", type=int, default=schedule.seed)
    train.add_argument("--d-model", type=int, default=shape.d_model)
    train.add_argument("--blocks", type=int, default=shape.n_blocks)
    train.add_argument("--heads", type=int, default=shape.n_heads)
    train.add_argument(
        "--taps", type=int, nargs="+", default=None, help="default: spread over the base's depth"
    )
    train.add_argument("--tap-mode", choices=["mix", "ladder"], default=shape.tap_mode)
    train.add_argument(
        "--tail-depth",
        type=int,
        default=0,
        help="train a tail over the base's top K layers instead of a carry-on (K >= L: all)",
    )
    train.add_argument("--rank", type=int, default=TailConfig().rank, help="the tail's LoRA rank")
    train.add_argument("--max-length", type=int, default=features.max_length)
    train.add_argument(
        "--storage-dtype", choices=["float32", "float16", "int8"], default=features.storage_dtype
    )
    train.add_argument("--valid-fraction", type=float, default=0.1)
    train.set_defaults(func=cmd_train)

    chat = sub.add_parser("chat", parents=[common], help="chat with the base or a carry-on")
    chat.add_argument("prompt", nargs="?", help="one prompt (default: one per stdin line)")
    chat.add_argument("--adapter", help="adapter artifact folder (a carry-on or a tail)")
    chat.add_argument("--temperature", type=float, default=0.0)
    chat.add_argument("--top-p", type=float, default=1.0)
    chat.add_argument("--max-tokens", type=int, default=256)
    chat.add_argument("--seed", type=int, default=None)
    chat.set_defaults(func=cmd_chat)

    evaluate = sub.add_parser("eval", parents=[common], help="held-out loss and exact match")
    evaluate.add_argument("data")
    evaluate.add_argument("--adapter")
    evaluate.add_argument("--limit", type=int, default=None)
    evaluate.add_argument("--max-length", type=int, default=512)
    evaluate.add_argument(
        "--exact-match",
        type=int,
        default=0,
        help='problems to decode greedily: the first N whose answer ends in "#### N"',
    )
    evaluate.add_argument("--max-tokens", type=int, default=256)
    evaluate.set_defaults(func=cmd_eval)

    from customization.demo_tasks import DEFAULT_TASK, TASKS

    demo = sub.add_parser("demo", parents=[common], help="the headless end-to-end demo")
    demo.add_argument("--task", choices=list(TASKS), default=DEFAULT_TASK)
    demo.add_argument("--work-dir", default=str(DEFAULT_DATA_DIR / "demo"))
    demo.add_argument("-n", type=int, default=None, help="training problems (default: the task's)")
    demo.add_argument("--held-out", type=int, default=50, help="held-out problems to evaluate")
    demo.add_argument("--epochs", type=int, default=None, help="default: the task's")
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from customization.errors import CustomizationError

    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except CustomizationError as exc:
        print(f"error ({exc.code}): {exc.message}", file=sys.stderr)
        return 2
