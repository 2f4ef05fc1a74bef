import datetime
import json
import os
import re
from pathlib import Path

import pytest

from customization.datasets import load_dataset
from customization.demo import demo_run, format_samples, format_table
from customization.demo_tasks import DEFAULT_TASK, HELD_OUT_SEED, TASKS, get_task
from tests.helpers.carry_on_kit import lively_base, tiny_config

REPO = Path(__file__).resolve().parents[2]
NEAR_MISSES = {
    "booking": lambda answer: answer.replace('"nights": ', '"nights": 1'),
    "dates": lambda answer: answer[:-1] + str((int(answer[-1]) + 1) % 10),
    "routing": lambda answer: {"billing": "refund"}.get(answer, "billing"),
    "arithmetic": lambda answer: answer.rsplit(" ", 1)[0] + f" {int(answer.rsplit()[-1]) + 1}",
}


def _answer(row: dict[str, object]) -> str:
    if "messages" in row:
        return str(row["messages"][-1]["content"])  # type: ignore[index]
    return str(row["answer"])


@pytest.mark.parametrize("name", TASKS)
def test_generation_is_deterministic_and_seeds_differ(name: str) -> None:
    """The same seed gives the same rows; the held-out seed gives other ones."""
    task = get_task(name)
    assert task.generate(30, seed=0) == task.generate(30, seed=0)
    train = {json.dumps(row) for row in task.generate(30, seed=0)}
    held_out = {json.dumps(row) for row in task.generate(30, seed=HELD_OUT_SEED)}
    assert len(train & held_out) < 10


@pytest.mark.parametrize("name", TASKS)
def test_generated_rows_are_a_valid_dataset(name: str) -> None:
    """Every task's JSONL loads as a dataset whose last turn is the answer."""
    examples = load_dataset(get_task(name).jsonl(25, seed=3))
    assert len(examples) == 25
    assert all(e.messages[-1]["role"] == "assistant" for e in examples)


@pytest.mark.parametrize("name", TASKS)
def test_checker_accepts_the_reference_and_rejects_a_near_miss(name: str) -> None:
    """A correct answer passes (also with stray white space); one wrong detail fails."""
    task = get_task(name)
    for row in task.generate(40, seed=5):
        answer = _answer(row)
        assert task.check(answer, answer)
        assert task.check(f"  {answer}\n", answer)
        assert not task.check(NEAR_MISSES[name](answer), answer), answer


def test_booking_json_restates_the_request() -> None:
    """The JSON holds the request's name and city, a real date and nights in 1..7."""
    for row in get_task("booking").generate(200, seed=1):
        prompt, answer = row["messages"][0]["content"], json.loads(_answer(row))  # type: ignore[index]
        assert list(answer) == ["name", "city", "date", "nights"]
        assert answer["name"] in prompt
        assert answer["city"] in prompt
        assert str(datetime.date.fromisoformat(answer["date"]).year) in prompt
        assert 1 <= answer["nights"] <= 7


def test_booking_checker_wants_the_same_shape_not_just_the_values() -> None:
    """Text around the JSON, a missing key or a number as a string do not match."""
    check = get_task("booking").check
    reference = '{"name": "Maya Patel", "city": "Oslo", "date": "2025-03-04", "nights": 2}'
    assert check(
        '{"nights": 2, "date": "2025-03-04", "city": "Oslo", "name": "Maya Patel"}', reference
    )
    assert not check(f"Here it is: {reference}", reference)
    assert not check('{"name": "Maya Patel", "city": "Oslo", "date": "2025-03-04"}', reference)
    assert not check(reference.replace("2}", '"2"}'), reference)


def test_dates_are_real_calendar_dates_named_in_the_prompt() -> None:
    """Each ISO answer parses, and its month's name and year are in the prompt."""
    for row in get_task("dates").generate(300, seed=2):
        prompt = row["messages"][0]["content"]  # type: ignore[index]
        date = datetime.date.fromisoformat(_answer(row))
        assert date.strftime("%B")[:3] in prompt
        assert str(date.year) in prompt


def test_routing_answers_come_from_the_label_set() -> None:
    """Every label is one of the five, and all five occur."""
    labels = {_answer(row) for row in get_task("routing").generate(200, seed=0)}
    assert labels == {"billing", "delivery", "account", "bug", "refund"}


def test_an_unknown_task_is_refused_naming_the_others() -> None:
    """get_task("nope") raises a ValueError that lists the tasks."""
    with pytest.raises(ValueError, match="booking"):
        get_task("nope")
    assert DEFAULT_TASK in TASKS


def test_held_out_prompts_are_the_user_turns_of_held_out_rows() -> None:
    """Suggestions for the playground are the held-out problems' questions."""
    task = get_task("routing")
    prompts = task.held_out_prompts(3)
    rows = task.generate(3, seed=HELD_OUT_SEED)
    assert prompts == [row["messages"][0]["content"] for row in rows]  # type: ignore[index]


@pytest.mark.parametrize("name", TASKS)
def test_each_task_runs_end_to_end_at_toy_size(name: str, tmp_path: Path) -> None:
    """Generate, extract, train one epoch, evaluate both sides and print the table."""
    base = lively_base(seed=0)
    result = demo_run(
        base,
        get_task(name),
        work_dir=tmp_path,
        n_train=12,
        n_held_out=3,
        epochs=1,
        carry_on_config=tiny_config(taps=(0, 1, -1), tap_mode="ladder"),
    )
    assert result.n_held_out == len(result.prompts) == len(result.adapter.predictions) == 3
    assert 0.0 <= result.base.exact_match <= 1.0
    assert 0.0 <= result.adapter.exact_match <= 1.0
    assert result.base.loss > 0
    assert result.adapter.loss > 0
    assert Path(result.adapter_path, "carry_on.safetensors").is_file()
    table = format_table(result)
    assert "held-out loss" in table
    assert "exact match (3)" in table
    assert "expected:" in format_samples(result, 2)


@pytest.mark.slow
def test_demo_command_on_the_real_base_ends_with_the_before_after_table(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`demo --task routing` at toy size prints the table and answers side by side."""
    import torch

    from customization import cli

    models_dir = os.environ.get("CARRY_ON_MODELS_DIR", str(REPO / "data" / "base_models"))
    previous = torch.get_num_threads()
    args = ["demo", "--task", "routing", "-n", "16", "--held-out", "4", "--epochs", "1"]
    try:
        code = cli.main(
            [*args, "--threads", "2", "--models-dir", models_dir, "--work-dir", str(tmp_path)]
        )
    finally:
        torch.set_num_threads(previous)
    out = capsys.readouterr().out
    assert code == 0
    assert re.search(r"held-out loss\s+\d+\.\d+\s+\d+\.\d+", out), out
    assert re.search(r"exact match \(4\)\s+\d/4 \d+%\s+\d/4 \d+%", out), out
    assert out.count("+ carry-on:") == 3
