"""Carry-on quality sweep (issue 8): what makes a carry-on learn well, at what cost.

    .venv/bin/python -m bench.sweep_carry_on --train 256 --heldout 96     # the proxy size
    .venv/bin/python -m bench.sweep_carry_on --variants ladder8-d256k4,final-d128k2
    .venv/bin/python -m bench.sweep_carry_on --exact-match base,ladder8-d256k4
    .venv/bin/python -m bench.sweep_carry_on --quick                        # a smoke run
    .venv/bin/python -m bench.sweep_carry_on --list                         # the variants

The base runs once over the data, storing a superset of taps (``SUPERSET``); every variant
then loads only the states it reads (the layout picks them by index), so the sweep pays for
one extraction however many variants it trains. Each variant trains in its own process
(``bench.common.run_child``), so its peak RSS is its own: a training node's, the frozen LM
head plus the cached states it reads, no base. Held-out loss is measured after every epoch
on float32 held-out states (as ``bench.train_runs`` does), keep-best on it.

Results merge into ``sweep.json`` and ``sweep.md`` (``--out``, default ``bench/results/``),
keyed by size (``<train>x<heldout>``) and variant, so rerunning a subset updates its rows.
The job time of a variant is the extraction of its size plus its training and save; the
extraction stores every state of ``SUPERSET``, which makes that share an upper bound (a
real job stores only its own taps; the base forward is the same).

The int8 variants read the float16 cache and quantize it per row in memory (the bridge's
``quantize_rows``), which is what an int8 extraction stores up to fp16 rounding.

Sections, in order: the variants; sizes and the log line; children (each in its own
process: extraction, training, decoding); the parent (the sweep); the report; entry.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.common import (
    REPO_ROOT,
    bench_parser,
    child_main,
    fmt,
    load_lm_head,
    load_problems,
    machine_info,
    md_table,
    median,
    parse_sized,
    resolve_base,
    run_child,
    write_results,
)

# -- the variants -----------------------------------------------------------------------------

SUPERSET = (0, *range(2, 29, 2), 27, -1)  # the embeddings, every other layer, 27, the final
MODULE = "bench.sweep_carry_on"
DEFAULT_WORK = REPO_ROOT / "data" / "sweep"
EVERY_LAYER_STEP = (-1, 4, 8, 12, 16, 20, 24, 27)  # the final state in, 7 intermediate rungs
BOTTOM_UP = (4, 8, 12, 16, 20, 24, 27, -1)  # layer 4 in, the final state at the top
EVERY_OTHER_LAYER = (-1, *range(2, 29, 2))  # the final state in, 14 rungs


def _variant(
    description: str,
    *,
    taps: Sequence[int] = (-1,),
    tap_mode: str = "mix",
    d_model: int = 128,
    n_blocks: int = 2,
    lr: float = 1e-3,
    epochs: int = 3,
    storage: str = "float16",
    **extra: Any,
) -> dict[str, Any]:
    carry_on_keys = {"n_heads", "mlp_ratio", "alpha", "gate_bias_init", "dropout"}
    carry_on = {"taps": list(taps), "tap_mode": tap_mode, "d_model": d_model, "n_blocks": n_blocks}
    carry_on.update({k: v for k, v in extra.items() if k in carry_on_keys})
    training = {"learning_rate": lr, "epochs": epochs}
    training.update({k: v for k, v in extra.items() if k not in carry_on_keys})
    return {
        "description": description,
        "carry_on": carry_on,
        "training": training,
        "storage": storage,
    }


LADDER8 = {"taps": EVERY_LAYER_STEP, "tap_mode": "ladder"}
WIDE = {"d_model": 256, "n_blocks": 4}
LADDER8_WIDE = {**LADDER8, **WIDE, "lr": 3e-3}

# The carry-on variants, in the order of the study: the reference points, then one
# change at a time. A row is (name, description, what differs from ``_variant``'s defaults).
CARRY_ON_ROWS: tuple[tuple[str, str, dict[str, Any]], ...] = (
    ("final-d128k2", "old default: final layer, d=128, k=2, lr 1e-3", {}),
    ("final-d128k2-lr3e-3", "old default at lr 3e-3", {"lr": 3e-3}),
    (
        "ladder4-d256k4",
        "issue's ladder: final in, taps 8/16/24 into blocks 1-3, d=256, k=4",
        {"taps": (-1, 8, 16, 24), "tap_mode": "ladder", **WIDE},
    ),
    (
        "ladder8-d128k2-lr3e-3",
        "ladder over 8 states (final in; 4..16 into block 1, 20..27 into block 2)",
        {**LADDER8, "lr": 3e-3},
    ),
    ("ladder8-d128k2-lr1e-2", "the default at lr 1e-2", {**LADDER8, "lr": 1e-2}),
    (
        "ladder8-d128k2-lr3e-3-drop0.1",
        "the default with dropout 0.1 (held-out, not capacity, is what lags)",
        {**LADDER8, "lr": 3e-3, "dropout": 0.1},
    ),
    (
        "ladder8-d128k2-lr3e-3-wd0.1",
        "the default with weight decay 0.1 (from 0.01)",
        {**LADDER8, "lr": 3e-3, "weight_decay": 0.1},
    ),
    (
        "ladder8-d128k2-lr3e-3-e6",
        "the default for 6 epochs, early stopping (patience 1)",
        {**LADDER8, "lr": 3e-3, "epochs": 6, "early_stopping_patience": 1},
    ),
    (
        "ladder8-d128k2-lr3e-3-e6full",
        "the default over a full 6-epoch schedule (no early stopping; keep-best)",
        {**LADDER8, "lr": 3e-3, "epochs": 6},
    ),
    (
        "ladder15-d128k2-lr3e-3",
        "ladder over 15 states: the final in, every other layer 2..28 as rungs",
        {"taps": EVERY_OTHER_LAYER, "tap_mode": "ladder", "lr": 3e-3},
    ),
    ("ladder8-d256k4-lr3e-3", "ladder over 8 states, two per block, d=256, k=4", LADDER8_WIDE),
    (
        "mix8-d256k4-lr3e-3",
        "the same 8 states summed at the input (softmax mix), d=256, k=4",
        {"taps": EVERY_LAYER_STEP, **WIDE, "lr": 3e-3},
    ),
    (
        "ladderup8-d256k4-lr3e-3",
        "bottom-up ladder: layer 4 in, ..., the final state into the last block",
        {"taps": BOTTOM_UP, "tap_mode": "ladder", **WIDE, "lr": 3e-3},
    ),
    ("ladder8-d256k4-lr5e-3", "ladder8 d=256 k=4 at lr 5e-3", {**LADDER8_WIDE, "lr": 5e-3}),
    (
        "ladder8-d384k4-lr3e-3",
        "ladder8 wider: d=384, k=4",
        {**LADDER8_WIDE, "d_model": 384, "n_heads": 6},
    ),
    ("ladder8-d256k6-lr3e-3", "ladder8 deeper: d=256, k=6", {**LADDER8_WIDE, "n_blocks": 6}),
    (
        "ladder8-d256k4-lr3e-3-drop0.1",
        "ladder8 d=256 k=4 with dropout 0.1",
        {**LADDER8_WIDE, "dropout": 0.1},
    ),
    (
        "ladder8-d256k4-lr3e-3-alpha4",
        "ladder8 d=256 k=4 with alpha 4 (a larger step for the merge)",
        {**LADDER8_WIDE, "alpha": 4.0},
    ),
    (
        "ladder8-d256k4-lr3e-3-gate2",
        "ladder8 d=256 k=4 with the gate open at start (bias +2)",
        {**LADDER8_WIDE, "gate_bias_init": 2.0},
    ),
    (
        "ladder8-d256k4-lr3e-3-e5",
        "ladder8 d=256 k=4, 5 epochs, early stopping (patience 1)",
        {**LADDER8_WIDE, "epochs": 5, "early_stopping_patience": 1},
    ),
    (
        "ladder8-d256k4-lr3e-3-int8",
        "ladder8 d=256 k=4 on the int8 bridge",
        {**LADDER8_WIDE, "storage": "int8"},
    ),
    (
        "ladder9-d256k4-lr3e-3",
        "ladder8 plus the embeddings (state 0) as a rung",
        {"taps": (-1, 0, 4, 8, 12, 16, 20, 24, 27), "tap_mode": "ladder", **WIDE, "lr": 3e-3},
    ),
)

# Not carry-ons: how much of LoRA all-linear's lead comes back when the branch re-runs the
# base's own top layers (LoRA r=8 on every linear; lr 2e-3, LoRA's 2e-4 learned far less).
TAIL_ROWS: tuple[tuple[str, str, dict[str, Any]], ...] = (
    *(
        (
            f"tail{k}-lora-lr2e-3",
            f"not a carry-on: the base's top {k} layers re-run from state {30 - k} "
            "(for SmolLM2), LoRA r=8 on every linear",
            {"layers": k},
        )
        for k in (2, 4, 8)
    ),
    (
        "tail8-lora-lr2e-3-e2",
        "not a carry-on: the 8-layer tail over a 2-epoch schedule (its cheapest within 5 %?)",
        {"layers": 8, "epochs": 2},
    ),
)


def _tail_variant(
    description: str, *, layers: int, lr: float = 2e-3, epochs: int = 3
) -> dict[str, Any]:
    """A tail (``customization/tail.py``): the top ``layers`` base layers + LoRA."""
    return {
        "kind": "tail",
        "description": description,
        "tail_layers": layers,
        "training": {"learning_rate": lr, "epochs": epochs},
        "storage": "float16",
    }


VARIANTS: dict[str, dict[str, Any]] = {
    **{name: _variant(text, **row) for name, text, row in CARRY_ON_ROWS},
    **{name: _tail_variant(text, **row) for name, text, row in TAIL_ROWS},
}

# -- sizes and the log line -------------------------------------------------------------------

FULL = {"train": 512, "heldout": 128, "max_length": 320, "batch_size": 8}
QUICK = {"train": 16, "heldout": 8, "max_length": 320, "batch_size": 8}


def _log(message: str) -> None:
    print(f"[sweep] {time.strftime('%H:%M:%S')} {message}", file=sys.stderr, flush=True)


# -- children: extraction (one per size) ------------------------------------------------------


def _states_for(taps: Sequence[int], num_layers: int) -> list[tuple[int, int]]:
    """The stored (base, hidden index) pairs a carry-on with ``taps`` reads, final included."""
    resolved = [t + num_layers + 1 if t < 0 else t for t in taps]
    return list(dict.fromkeys([(0, t) for t in resolved] + [(0, num_layers)]))


def run_extract(spec: dict[str, Any]) -> dict[str, Any]:
    """Validate, tokenize and extract the superset of taps for training and held-out data."""
    from customization.base_model import load_base_model
    from customization.config import FeatureConfig
    from customization.datasets import dataset_sha256, load_dataset
    from customization.pipeline import extract, feature_part
    from customization.training import FeatureLayout, evaluate

    base = load_base_model(spec["base_dir"])
    problems = load_problems(spec["gsm8k"], spec["train"], spec["heldout"])
    out: dict[str, Any] = {"data_source": problems.source}
    for name, data, dtype in (
        ("train", problems.train, "float16"),
        ("heldout", problems.held_out, "float32"),
    ):
        started = time.perf_counter()
        config = FeatureConfig(
            taps=tuple(spec["taps"]), max_length=spec["max_length"], storage_dtype=dtype
        )
        part = feature_part(base, load_dataset(data), config, digest=dataset_sha256(data))
        features = extract(base, [part], config, cache_dir=spec["cache_dir"]).feature_sets[0]
        out[name] = {
            "dir": str(features.path),
            "seconds": time.perf_counter() - started,
            "extracted": features.extracted,
            "n_examples": features.n_examples,
            "n_tokens": features.n_tokens,
            "n_target_tokens": features.n_target_tokens,
            "bytes": features.nbytes,
            "n_states": len(features.states),
        }
    held_out = features.load(states=[(0, base.num_layers)])
    layout = FeatureLayout.for_taps(held_out, (-1,), base.num_layers)
    out["base_held_out_loss"] = evaluate(None, held_out, layout, base.head_weight)["loss"]
    out["fingerprint"] = base.fingerprint().to_dict()
    return out


def _feature_bytes(n_tokens: int, width: int, n_states: int, storage: str) -> int:
    """Bytes of a feature set holding ``n_states`` states: values, int8 scales, ids, masks."""
    per_value = {"float32": 4, "float16": 2, "int8": 1}[storage]
    scales = 4 if storage == "int8" else 0
    return n_tokens * (n_states * (width * per_value + scales) + 4 + 1)


def _to_int8(data: Any) -> None:
    """Quantize loaded states in place, per row, as the int8 bridge stores them."""
    from customization.features import StoredState, quantize_rows

    for example in data.examples:
        example.states = [StoredState(*quantize_rows(s.dequantize())) for s in example.states]


# -- children: training (a carry-on, a tail) --------------------------------------------------


def run_train(spec: dict[str, Any]) -> dict[str, Any]:
    """One variant: load the states it reads, train with held-out loss per epoch, save."""
    from bench.train_runs import train_with_history
    from customization.base_model import BaseFingerprint
    from customization.config import CarryOnConfig, TrainingConfig
    from customization.features import FeatureSet
    from customization.pipeline import save
    from customization.training import build_carry_on

    variant = spec["variant"]
    if variant.get("kind") == "tail":
        return run_tail(spec)
    started = time.perf_counter()
    head, num_layers = load_lm_head(Path(spec["base_dir"]))
    config = CarryOnConfig(**{**variant["carry_on"], "taps": tuple(variant["carry_on"]["taps"])})
    states = _states_for(config.taps, num_layers)
    train = FeatureSet.open(spec["train_dir"]).load(states=states)
    if variant["storage"] == "int8":
        _to_int8(train)
    held_out = FeatureSet.open(spec["heldout_dir"]).load(states=states)
    setup = time.perf_counter() - started
    width = int(head.shape[1])
    training = TrainingConfig(
        batch_size=spec["batch_size"], seed=spec["seed"], **variant["training"]
    )
    carry_on = build_carry_on(config, width=width, seed=training.seed)
    fingerprint = BaseFingerprint.from_dict(spec["fingerprint"])
    started = time.perf_counter()
    result, history = train_with_history(
        carry_on, train, held_out, head, training, fingerprint=fingerprint
    )
    training_seconds = time.perf_counter() - started
    started = time.perf_counter()
    info = save(result.carry_on, Path(spec["out_dir"]), fingerprint=fingerprint)
    n_tokens = sum(len(e.input_ids) for e in train.examples)
    return {
        "setup_seconds": setup,
        "training_seconds": training_seconds,
        "save_seconds": time.perf_counter() - started,
        "epochs": [
            {k: m.get(k) for k in ("epoch", "train_loss", "valid_loss", "valid_token_accuracy")}
            | {"seconds": m["epoch_seconds"]}
            for m in history
        ],
        "best_valid_loss": result.best_valid_loss,
        "best_epoch": result.best_epoch,
        "stopped_early": result.stopped_early,
        "parameters": info.num_parameters,
        "artifact_bytes": info.nbytes,
        "feature_bytes": _feature_bytes(n_tokens, width, len(states), variant["storage"]),
        "n_states": len(states),
    }


def run_tail(spec: dict[str, Any]) -> dict[str, Any]:
    """A tail on the same cached states, through the product's path: ``load_training_node``
    (the top layers, the final norm and the head, never the layers below), the pipeline's
    ``train`` and ``save``."""
    from bench.train_runs import train_with_history
    from customization.base_model import BaseFingerprint
    from customization.config import TailConfig, TrainingConfig
    from customization.features import FeatureSet
    from customization.pipeline import save
    from customization.training import FeatureLayout, evaluate, load_training_node

    variant = spec["variant"]
    started = time.perf_counter()
    fingerprint = BaseFingerprint.from_dict(spec["fingerprint"])
    config = TailConfig(depth=variant["tail_layers"]).resolved(num_layers=fingerprint.num_layers)
    states = [(0, config.first_layer)]  # the only state a tail reads
    train = FeatureSet.open(spec["train_dir"]).load(states=states)
    held_out = FeatureSet.open(spec["heldout_dir"]).load(states=states)
    tail, head = load_training_node(spec["base_dir"], config, seed=spec["seed"])
    setup = time.perf_counter() - started
    training = TrainingConfig(
        batch_size=spec["batch_size"], seed=spec["seed"], **variant["training"]
    )
    layout = FeatureLayout.for_model(held_out, tail, fingerprint.num_layers)
    init_loss = evaluate(tail, held_out, layout, head, batch_size=training.batch_size)["loss"]
    started = time.perf_counter()
    result, history = train_with_history(
        tail, train, held_out, head, training, fingerprint=fingerprint
    )
    training_seconds = time.perf_counter() - started
    started = time.perf_counter()
    info = save(result.carry_on, Path(spec["out_dir"]), fingerprint=fingerprint)
    n_tokens = sum(len(e.input_ids) for e in train.examples)
    return {
        "setup_seconds": setup,
        "training_seconds": training_seconds,
        "save_seconds": time.perf_counter() - started,
        "init_valid_loss": init_loss,
        "epochs": [
            {"epoch": m["epoch"], "valid_loss": m["valid_loss"], "seconds": m["epoch_seconds"]}
            for m in history
        ],
        # The keep-best a job would return, as the carry-on runs report it.
        "best_valid_loss": result.best_valid_loss,
        "best_epoch": result.best_epoch,
        "stopped_early": result.stopped_early,
        "parameters": info.num_parameters,
        "artifact_bytes": info.nbytes,
        "feature_bytes": _feature_bytes(n_tokens, int(head.shape[1]), 1, variant["storage"]),
        "n_states": 1,
    }


# -- children: decoding (exact match) ---------------------------------------------------------


def run_exact_match(spec: dict[str, Any]) -> dict[str, Any]:
    """Greedy final-answer exact match on the held-out problems, base or base + carry-on."""
    from bench.exact_match import exact_match_run

    problems = load_problems(spec["gsm8k"], spec["train"], spec["heldout"])
    return exact_match_run(
        Path(spec["base_dir"]),
        problems.held_out,
        kind="carry_on" if spec["adapter"] else "base",
        adapter=spec["adapter"],
        n=spec["heldout"],
        max_new_tokens=spec["max_new_tokens"],
    )


def run_decode(spec: dict[str, Any]) -> dict[str, Any]:
    """Greedy decoding tokens/s, base alone vs base + carry-on, interleaved (the cores are
    shared: alternating the two paths exposes both to the same background load)."""
    from customization.base_model import load_base_model
    from customization.checkpoint import load_carry_on
    from customization.config import GenerationConfig
    from customization.datasets import load_dataset
    from customization.generation import generate

    base = load_base_model(spec["base_dir"])
    carry_on = load_carry_on(spec["adapter"], base_fingerprints=[base.fingerprint()])
    problems = load_problems(spec["gsm8k"], spec["train"], spec["heldout"])
    prompts = [
        base.tokenizer.encode_prompt([dict(e.messages[0])])
        for e in load_dataset(problems.held_out)[:3]
    ]
    config = GenerationConfig(temperature=0.0, max_new_tokens=spec["max_new_tokens"])
    rates: dict[str, list[float]] = {"base": [], "carry_on": []}
    for _ in range(spec["repeats"]):
        for name, adapter in (("base", None), ("carry_on", carry_on)):
            tokens, started = 0, time.perf_counter()
            for prompt in prompts:
                tokens += generate(base, prompt, config, adapter).completion_tokens
            rates[name].append(tokens / (time.perf_counter() - started))
    base_rate, ours = median(rates["base"]), median(rates["carry_on"])
    return {
        "tokens_per_second": rates,
        "base": base_rate,
        "carry_on": ours,
        "ratio": ours / base_rate if base_rate else None,
    }


CHILD_RUNS = {
    "extract": run_extract,
    "train": run_train,
    "exact_match": run_exact_match,
    "decode": run_decode,
}


# -- the parent -------------------------------------------------------------------------------


def _size_key(args: argparse.Namespace) -> str:
    return f"{args.train}x{args.heldout}"


def _load_results(path: Path) -> dict[str, Any]:
    if path.is_file():
        result: dict[str, Any] = json.loads(path.read_text("utf-8"))
        return result
    return {"benchmark": "sweep_carry_on", "sizes": {}}


def _spec(args: argparse.Namespace, base_dir: Path, **extra: Any) -> dict[str, Any]:
    return {
        "threads": args.threads,
        "base_dir": str(base_dir),
        "gsm8k": args.gsm8k,
        "train": args.train,
        "heldout": args.heldout,
        "max_length": args.max_length,
        "batch_size": args.batch_size,
        "seed": args.seed,
        "cache_dir": str(args.work / "features"),
        **extra,
    }


def _extraction(args: argparse.Namespace, base_dir: Path, size: dict[str, Any]) -> dict[str, Any]:
    """Extract once per size; a rerun finds the cache and keeps the first run's timing."""
    _log(f"extraction of {args.train} + {args.heldout} problems (taps {list(SUPERSET)}) ...")
    spec = _spec(args, base_dir, kind="extract", taps=list(SUPERSET))
    done = run_child(MODULE, spec, work_dir=args.work)
    previous = size.get("extraction")
    if previous and not done["train"]["extracted"]:
        for name in ("train", "heldout"):
            done[name]["seconds"] = previous[name]["seconds"]
            done[name]["extracted"] = previous[name]["extracted"]
        done["peak_rss_bytes"] = previous.get("peak_rss_bytes", done["peak_rss_bytes"])
    return dict(done)


def _train_variant(
    args: argparse.Namespace, base_dir: Path, name: str, extraction: dict[str, Any]
) -> dict[str, Any]:
    out_dir = args.work / _size_key(args) / name / "adapter"
    if out_dir.exists():
        shutil.rmtree(out_dir)
    spec = _spec(
        args,
        base_dir,
        kind="train",
        variant=VARIANTS[name],
        train_dir=extraction["train"]["dir"],
        heldout_dir=extraction["heldout"]["dir"],
        fingerprint=extraction["fingerprint"],
        out_dir=str(out_dir),
    )
    run = run_child(MODULE, spec, work_dir=args.work)
    run["variant"] = VARIANTS[name]
    run["adapter"] = str(out_dir)
    run["job_seconds"] = (
        extraction["train"]["seconds"]
        + run["setup_seconds"]
        + run["training_seconds"]
        + run["save_seconds"]
    )
    return run


def run_sweep(args: argparse.Namespace) -> dict[str, Any]:
    results_file = args.out / "sweep.json"
    results = _load_results(results_file)
    base_dir = resolve_base(args.base)
    args.work.mkdir(parents=True, exist_ok=True)
    size = results["sizes"].setdefault(_size_key(args), {"runs": {}, "exact_match": {}})
    size["settings"] = {
        "train_problems": args.train,
        "held_out_problems": args.heldout,
        "max_length": args.max_length,
        "batch_size": args.batch_size,
        "seed": args.seed,
        "threads": args.threads,
    }
    size["extraction"] = _extraction(args, base_dir, size)
    results["machine"] = machine_info(args.threads)
    only_other = args.exact_match or args.extract_only or args.decode
    names = args.variants or ([] if only_other else list(VARIANTS))
    for name in names:
        _log(f"{name}: {VARIANTS[name]['description']} ...")
        run = _train_variant(args, base_dir, name, size["extraction"])
        size["runs"][name] = run
        losses = ", ".join(f"{e['valid_loss']:.4f}" for e in run["epochs"])
        _log(f"{name}: held-out {losses}; {run['training_seconds']:.0f} s training")
        _write(args.out, results)
    for name in args.exact_match:
        adapter = "" if name == "base" else size["runs"][name]["adapter"]
        _log(f"exact match: {name} ...")
        spec = _spec(args, base_dir, kind="exact_match", adapter=adapter)
        spec["max_new_tokens"] = args.max_new_tokens
        size["exact_match"][name] = run_child(MODULE, spec, work_dir=args.work)
        _log(f"exact match {name}: {size['exact_match'][name]['exact_match']:.3f}")
        _write(args.out, results)
    if args.decode:
        _log(f"decoding speed: base vs {args.decode} ...")
        spec = _spec(args, base_dir, kind="decode", adapter=size["runs"][args.decode]["adapter"])
        spec.update(max_new_tokens=64, repeats=3)
        size["decode"] = {"variant": args.decode, **run_child(MODULE, spec, work_dir=args.work)}
        _log(f"decoding ratio: {fmt(size['decode']['ratio'], 3)}")
    _write(args.out, results)
    return results


# -- the report -------------------------------------------------------------------------------


def _mb(nbytes: float | None) -> str:
    return "n/a" if nbytes is None else f"{nbytes / 1e6:,.1f}"


def _size_markdown(key: str, size: dict[str, Any]) -> str:
    extraction = size["extraction"]
    base_loss = extraction["base_held_out_loss"]
    settings = size["settings"]
    rows = []
    for name, run in size["runs"].items():
        best = run["best_valid_loss"]
        rows.append(
            [
                f"`{name}`",
                run["variant"]["description"],
                f"{run['parameters']:,}",
                " / ".join(fmt(e["valid_loss"], 3) for e in run["epochs"]),
                f"**{fmt(best, 4)}** ({(best - base_loss) / base_loss:+.1%})",
                fmt(run["training_seconds"], 0),
                fmt(run["job_seconds"], 0),
                _mb(run["peak_rss_bytes"]),
                _mb(run["artifact_bytes"]),
                _mb(run["feature_bytes"]),
                fmt(run.get("cpu_share_others"), 2),
            ]
        )
    headers = [
        "variant",
        "what",
        "params",
        "held-out loss per epoch",
        "best (vs base)",
        "train s",
        "job s (extraction incl.)",
        "peak RSS MB",
        "artifact MB",
        "features MB",
        "CPU used by others",
    ]
    train = extraction["train"]
    parts = [
        f"\n## {settings['train_problems']} training / {settings['held_out_problems']} "
        f"held-out problems (`{key}`)\n\n",
        f"Max {settings['max_length']} tokens, batch {settings['batch_size']}, seed "
        f"{settings['seed']}, {settings['threads']} torch threads; {train['n_tokens']:,} "
        f"training tokens ({train['n_target_tokens']:,} assistant targets). Base alone, "
        f"held-out loss **{fmt(base_loss, 4)}**. Extraction (one base forward, "
        f"{train['n_states']} states stored): {fmt(train['seconds'], 0)} s for the training "
        f"set, {_mb(train['bytes'])} MB; its peak RSS {_mb(extraction['peak_rss_bytes'])} MB.\n\n",
        md_table(headers, rows),
    ]
    if size.get("decode"):
        decode = size["decode"]
        parts.append(
            f"\nGreedy decoding, 64 new tokens, 3 prompts, interleaved, median of "
            f"{len(decode['tokens_per_second']['base'])}: base {fmt(decode['base'], 1)} tokens/s, "
            f"base + `{decode['variant']}` {fmt(decode['carry_on'], 1)} tokens/s "
            f"(**{fmt(decode['ratio'], 3)}×**).\n"
        )
    if size.get("exact_match"):
        em_rows = [
            [name, f"{em['exact_match']:.3f}", em["n"], em["max_new_tokens"], fmt(em["seconds"], 0)]
            for name, em in size["exact_match"].items()
        ]
        parts += [
            "\nGreedy final-answer exact match on the held-out problems:\n\n",
            md_table(["model", "exact match", "problems", "max new tokens", "seconds"], em_rows),
        ]
    return "".join(parts)


def markdown(results: dict[str, Any]) -> str:
    machine = results.get("machine", {})
    parts = [
        "# Carry-on quality sweep (issue 8)\n\n",
        "Written by `python -m bench.sweep_carry_on`; the write-up is "
        "`docs/carry_on_quality.md`. Held-out loss is the mean assistant-token loss on the "
        "held-out problems after each epoch (keep-best: the best epoch is what a job "
        "returns). Job seconds = the size's extraction (all states of the superset, an upper "
        "bound) + loading + training + save. Peak RSS is the training process alone (LM head "
        "+ the states the variant reads). Artifact MB: float32 safetensors. Features MB: the "
        "training states the variant reads (fp16, or int8 + row scales). Column CPU used by "
        "others: the share of the machine other processes took during the run; compare "
        "times only between rows with a similar share, losses freely (they do not depend on "
        "the load). Rows `tail*` are not carry-ons but the base's own top layers re-run "
        "with LoRA, trained as a job trains a tail (`customization/tail.py`, "
        "`load_training_node`: the top layers, final norm and head only; rows measured "
        "before 2026-12-01 used the research probe `bench/tail.py` that preceded it).\n\n",
        f"Machine: {machine.get('cpu', '?')}, {machine.get('cores', '?')} cores, "
        f"torch {machine.get('torch', '?')}, last run {machine.get('date', '?')}.\n",
    ]
    for key, size in results["sizes"].items():
        parts.append(_size_markdown(key, size))
    return "".join(parts)


def _write(out: Path, results: dict[str, Any]) -> None:
    """Merge into what is on disk: two sweeps over different variants may run at once."""
    on_disk = _load_results(out / "sweep.json")
    for key, size in results["sizes"].items():
        merged = on_disk["sizes"].setdefault(key, {"runs": {}, "exact_match": {}})
        for part in ("runs", "exact_match"):  # "decode" and the rest: the latest wins
            merged.setdefault(part, {}).update(size.get(part, {}))
        merged.update({k: v for k, v in size.items() if k not in ("runs", "exact_match")})
        size.update(merged)
    on_disk.update({k: v for k, v in results.items() if k != "sizes"})
    write_results(out, "sweep", on_disk, markdown(on_disk))


# -- entry ------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = bench_parser("bench.sweep_carry_on", __doc__, "a smoke run on a few problems")
    parser.add_argument("--train", type=int, help="training problems (default 512)")
    parser.add_argument("--heldout", type=int, help="held-out problems (default 128)")
    parser.add_argument("--max-length", type=int)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--variants", type=lambda s: [v for v in s.split(",") if v], default=[])
    parser.add_argument(
        "--exact-match",
        type=lambda s: [v for v in s.split(",") if v],
        default=[],
        help="'base' and/or trained variants of this size to decode greedily",
    )
    parser.add_argument("--max-new-tokens", type=int, default=320)
    parser.add_argument("--list", action="store_true", help="print the variants and exit")
    parser.add_argument("--extract-only", action="store_true", help="fill the feature cache")
    parser.add_argument("--decode", help="a trained variant: its decoding speed vs the base")
    parser.add_argument("--work", type=Path, default=DEFAULT_WORK, help="cache and adapters")
    args = parse_sized(parser, argv, full=FULL, quick=QUICK)
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; --list shows them")
    tails = [
        v
        for v in [*args.exact_match, *([args.decode] if args.decode else [])]
        if VARIANTS.get(v, {}).get("kind") == "tail"
    ]
    if tails:
        parser.error(f"{tails}: tails are a loss study; only carry-ons decode here")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    arguments = list(sys.argv[1:] if argv is None else argv)
    if len(arguments) == 2 and all(a.endswith(".json") for a in arguments):
        return child_main(lambda spec: CHILD_RUNS[spec["kind"]](spec))  # a run_child child
    args = parse_args(arguments)
    if args.list:
        for name, variant in VARIANTS.items():
            print(f"{name:36} {variant['description']}")
        return 0
    if args.quick:
        args.out = args.work / "quick-results"
    run_sweep(args)
    _log(f"wrote {args.out / 'sweep.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
