import io
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from customization import cli, generation
from customization.base_model import FrozenBase, load_base_model
from customization.checkpoint import CONFIG_FILE, WEIGHTS_FILE, load_carry_on
from customization.config import (
    BUNDLED_BASE_LAYERS,
    CarryOnConfig,
    FeatureConfig,
    GenerationConfig,
    TrainingConfig,
    default_taps,
)
from customization.datasets import read_dataset_file
from customization.decode_state import StepOutput
from customization.generation import generate
from tests.helpers.carry_on_kit import toy_jsonl

REPO = Path(__file__).resolve().parents[2]
TINY = ["--d-model", "16", "--heads", "2", "--epochs", "1", "--max-length", "64"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("data") / "toy.jsonl"
    path.write_bytes(toy_jsonl(10))
    return path


@pytest.fixture(scope="module")
def trained(
    hf_base_dir: Path, dataset: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[int, Path, Path]:
    """(exit code, run folder, cache folder) of one `train` run on the tiny HF base."""
    work = tmp_path_factory.mktemp("cli")
    run, cache = work / "run", work / "features"
    argv = ["train", str(dataset), "--base", str(hf_base_dir), "--out", str(run)]
    code = cli.main([*argv, "--cache-dir", str(cache), *TINY, "--taps", "1", "-1"])
    return code, run, cache


def test_demo_data_writes_a_valid_dataset(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`demo-data out -n 12` writes twelve valid examples and prints the path."""
    out = tmp_path / "demo.jsonl"
    assert cli.main(["demo-data", str(out), "-n", "12", "--seed", "4"]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    examples = read_dataset_file(out)
    assert len(examples) == 12
    assert all(e.messages[-1]["content"].splitlines()[-1].startswith("#### ") for e in examples)


def test_python_dash_m_customization_demo_data_runs(tmp_path: Path) -> None:
    """`python -m customization demo-data` works as a module entry point."""
    out = tmp_path / "demo.jsonl"
    completed = subprocess.run(
        [sys.executable, "-m", "customization", "demo-data", str(out), "-n", "5"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr
    assert len(read_dataset_file(out)) == 5


def test_train_writes_an_adapter_for_the_given_base(trained: tuple[int, Path, Path]) -> None:
    """`train --base <hf folder>` exits 0 and writes a loadable adapter and checkpoints."""
    code, run, cache = trained
    assert code == 0
    assert (run / "adapter" / WEIGHTS_FILE).is_file()
    assert (run / "adapter" / CONFIG_FILE).is_file()
    assert list((run / "checkpoints").glob("step-*/trainer_state.json"))
    assert len(list(cache.iterdir())) == 2  # train and valid feature sets
    carry_on = load_carry_on(run / "adapter")
    assert carry_on.config.taps == (1, -1)
    assert carry_on.config.d_model == 16


def test_train_prints_a_summary_and_reuses_cached_features(
    trained: tuple[int, Path, Path],
    hf_base_dir: Path,
    dataset: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A second run on the same data and base skips extraction (extracted: false)."""
    _, _, cache = trained
    argv = ["train", str(dataset), "--base", str(hf_base_dir), "--out", str(tmp_path / "again")]
    capsys.readouterr()
    assert cli.main([*argv, "--cache-dir", str(cache), *TINY, "--taps", "1", "-1"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["extracted"] is False
    assert summary["parameters"] > 0
    assert len(summary["history"]) == 1


def test_chat_prints_the_greedy_reply_of_base_and_adapter(
    trained: tuple[int, Path, Path], hf_base_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`chat --adapter` exits 0 and streams exactly the adapter's greedy reply."""
    _, run, _ = trained
    capsys.readouterr()
    argv = ["chat", "repeat river", "--base", str(hf_base_dir), "--adapter", str(run / "adapter")]
    assert cli.main([*argv, "--max-tokens", "6"]) == 0
    base = load_base_model(hf_base_dir)
    carry_on = load_carry_on(run / "adapter", base_fingerprints=[base.fingerprint()])
    prompt = base.tokenizer.encode_prompt([{"role": "user", "content": "repeat river"}])
    reply = generate(base, prompt, GenerationConfig(temperature=0.0, max_new_tokens=6), carry_on)
    assert capsys.readouterr().out == reply.text + "\n"


def test_chat_answers_one_prompt_per_stdin_line(
    hf_base_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without a prompt argument, chat answers each line of stdin (base only here)."""
    prompts: list[list[int]] = []
    real_stream = generation.stream

    def spy(base: FrozenBase, prompt_ids: list[int], *args: Any) -> Iterator[StepOutput]:
        prompts.append(list(prompt_ids))
        return real_stream(base, prompt_ids, *args)

    monkeypatch.setattr(generation, "stream", spy)
    monkeypatch.setattr(sys, "stdin", io.StringIO("hi\nhello\n"))
    assert cli.main(["chat", "--base", str(hf_base_dir), "--max-tokens", "3"]) == 0
    tokenizer = load_base_model(hf_base_dir).tokenizer
    expected = [tokenizer.encode_prompt([{"role": "user", "content": t}]) for t in ("hi", "hello")]
    assert prompts == expected


def test_eval_reports_heldout_metrics_and_exact_match(
    trained: tuple[int, Path, Path],
    hf_base_dir: Path,
    dataset: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`eval --adapter` prints loss, token accuracy and exact match as JSON; exact match
    decodes only problems with a checkable "#### N" answer (null where there is none)."""
    from customization.demo_data import write_demo_dataset

    _, run, _ = trained
    problems = write_demo_dataset(tmp_path / "problems.jsonl", 6, seed=0)
    for data, checkable in ((problems, 2), (dataset, 0)):
        capsys.readouterr()
        argv = ["eval", str(data), "--base", str(hf_base_dir), "--adapter", str(run / "adapter")]
        argv += ["--limit", "4", "--max-length", "512", "--exact-match", "2", "--max-tokens", "4"]
        assert cli.main(argv) == 0
        report = json.loads(capsys.readouterr().out)
        assert report["loss"] > 0
        assert 0.0 <= report["token_accuracy"] <= 1.0
        assert report["exact_match_problems"] == checkable
        if checkable:
            assert 0.0 <= report["exact_match"] <= 1.0
        else:
            assert report["exact_match"] is None


def test_errors_are_reported_with_their_code_and_exit_status_2(
    hf_base_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An invalid dataset ends with exit code 2 and a one-line error naming the line."""
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n{"oops": 1}\n')
    argv = ["train", str(bad), "--base", str(hf_base_dir), "--out", str(tmp_path / "run")]
    assert cli.main([*argv, "--cache-dir", str(tmp_path / "features"), *TINY]) == 2
    error = capsys.readouterr().err
    assert error.startswith("error (invalid_training_file):")
    assert "line 2" in error


def test_chat_refuses_an_adapter_for_another_base(
    trained: tuple[int, Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Chatting with an adapter on a base it was not trained for exits 2 with a clear error."""
    from tests.helpers.carry_on_kit import save_hf_base
    from tests.helpers.tiny_models import tiny_base

    other = tmp_path / "other-base"
    other.mkdir()
    save_hf_base(tiny_base(seed=9), other)
    _, run, _ = trained
    argv = ["chat", "hi", "--base", str(other), "--adapter", str(run / "adapter")]
    assert cli.main(argv) == 2
    assert "error (incompatible_base_model)" in capsys.readouterr().err


def test_train_defaults_are_the_config_dataclasses_defaults() -> None:
    """`train` with no options trains the default carry-on on the default schedule."""
    args = cli.build_parser().parse_args(["train", "data.jsonl", "--out", "run"])
    shape, schedule, features = CarryOnConfig(), TrainingConfig(), FeatureConfig()
    assert cli._carry_on_config(args, BUNDLED_BASE_LAYERS) == shape
    assert cli._carry_on_config(args, 2).taps == default_taps(2)
    assert (args.epochs, args.batch_size, args.lr, args.patience, args.seed) == (
        schedule.epochs,
        schedule.batch_size,
        schedule.learning_rate,
        schedule.early_stopping_patience,
        schedule.seed,
    )
    assert (args.max_length, args.storage_dtype) == (features.max_length, features.storage_dtype)


def test_train_with_a_tail_depth_writes_a_peft_folder_that_chat_and_eval_serve(
    hf_base_dir: Path, dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`train --tail-depth 1` saves a PEFT LoRA folder; `chat` and `eval` serve it."""
    from customization.checkpoint import PEFT_CONFIG_FILE, load_tail_adapter

    run = tmp_path / "tail"
    argv = ["train", str(dataset), "--base", str(hf_base_dir), "--out", str(run)]
    assert cli.main([*argv, "--cache-dir", str(tmp_path / "f"), *TINY, "--tail-depth", "1"]) == 0
    peft_config = json.loads((run / "adapter" / PEFT_CONFIG_FILE).read_text())
    assert peft_config["layers_to_transform"] == [1]
    base = load_base_model(hf_base_dir)
    tail = load_tail_adapter(run / "adapter", base_fingerprints=[base.fingerprint()])
    capsys.readouterr()
    chat = ["chat", "repeat river", "--base", str(hf_base_dir), "--adapter", str(run / "adapter")]
    assert cli.main([*chat, "--max-tokens", "6"]) == 0
    prompt = base.tokenizer.encode_prompt([{"role": "user", "content": "repeat river"}])
    reply = generate(base, prompt, GenerationConfig(temperature=0.0, max_new_tokens=6), tail)
    assert capsys.readouterr().out == reply.text + "\n"
    evaluate = ["eval", str(dataset), "--base", str(hf_base_dir), "--adapter", str(run / "adapter")]
    assert cli.main([*evaluate, "--max-length", "64"]) == 0
    assert json.loads(capsys.readouterr().out)["loss"] > 0
