import ast
import json
import operator
import re
from pathlib import Path

import pytest

from customization.answers import extract_final_answer
from customization.datasets import load_dataset, read_dataset_file
from customization.demo_data import generate_demo_problems, write_demo_dataset

_ANNOTATION = re.compile(r"(\S+)=<<([^=<>]+)=(-?\d+)>>(-?\d+)")
_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul}


def _evaluate(expr: str) -> int:
    """Evaluate integer + - * / arithmetic without eval; divisions must be exact."""

    def walk(node: ast.expr) -> int:
        if isinstance(node, ast.Constant) and type(node.value) is int:
            return node.value
        assert isinstance(node, ast.BinOp), ast.dump(node)
        left, right = walk(node.left), walk(node.right)
        if isinstance(node.op, ast.Div):
            assert left % right == 0, expr
            return left // right
        result: int = _OPS[type(node.op)](left, right)
        return result

    return walk(ast.parse(expr, mode="eval").body)


def test_generation_is_deterministic_for_a_seed() -> None:
    """The same seed gives the same problems; another seed gives others."""
    assert generate_demo_problems(50, seed=3) == generate_demo_problems(50, seed=3)
    assert generate_demo_problems(50, seed=3) != generate_demo_problems(50, seed=4)


def test_annotations_and_final_answers_recompute_correctly() -> None:
    """Every <<expr=value>> is right, and #### repeats the last computed value."""
    for problem in generate_demo_problems(500, seed=0):
        *reasoning, final = problem["answer"].split("\n")
        assert len(reasoning) >= 2
        results = []
        for line in reasoning:
            (match,) = _ANNOTATION.findall(line)
            shown, expr, value, after = match
            assert shown == expr
            assert _evaluate(expr) == int(value) == int(after)
            assert int(value) > 0
            results.append(int(value))
        assert final == f"#### {results[-1]}"
        assert extract_final_answer(problem["answer"]) == str(results[-1])


def test_problems_vary_in_templates_and_length() -> None:
    """Many templates are used and multi-step problems reach four or more lines."""
    problems = generate_demo_problems(300, seed=1)
    lengths = {p["answer"].count("\n") for p in problems}
    assert len({p["question"] for p in problems}) > 290
    for phrase in ("change", "in total", "miles per hour", "At the same speed", "each friend get"):
        assert any(phrase in p["question"] for p in problems), phrase
    for phrase in ("How many weeks", "an hour", "have now?"):
        assert any(phrase in p["question"] for p in problems), phrase
    assert min(lengths) == 2
    assert max(lengths) >= 4


def test_problems_parse_back_as_a_cot_dataset(tmp_path: Path) -> None:
    """A written demo dataset loads through the validator as the cot format."""
    path = write_demo_dataset(tmp_path / "demo.jsonl", 40, seed=5)
    examples = read_dataset_file(path)
    assert len(examples) == 40
    assert [e.messages[0]["content"] for e in examples] == [
        p["question"] for p in generate_demo_problems(40, seed=5)
    ]
    assert list(tmp_path.iterdir()) == [path]


def test_demo_problems_validate_in_memory() -> None:
    """Generated problems are valid cot lines with a user then assistant message."""
    data = "".join(json.dumps(p) + "\n" for p in generate_demo_problems(20, seed=2)).encode()
    examples = load_dataset(data)
    assert [m["role"] for m in examples[0].messages] == ["user", "assistant"]


def test_negative_count_is_rejected() -> None:
    """n must not be negative."""
    with pytest.raises(ValueError, match="n must be"):
        generate_demo_problems(-1, seed=0)
