"""Fixtures for evaluations: a user with a bearer key, a held-out file, two adapters."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest

from tests.factories import FileFactory, UserFactory
from tests.webapp.api.conftest import bearer_client


def problems_jsonl(n: int, *, seed: int = 3) -> bytes:
    """GSM8K-style problems whose answers end in "#### N" (checkable by exact match)."""
    from customization.demo_data import generate_demo_problems

    rows = generate_demo_problems(n, seed=seed)
    return "".join(json.dumps(row) + "\n" for row in rows).encode()


@pytest.fixture
def user(db: None) -> Any:
    return UserFactory()


@pytest.fixture
def api(user: Any) -> Any:
    return bearer_client(user)


@pytest.fixture
def held_out(user: Any, tiny_base_model: Any) -> Any:
    """Six demo problems as the user's upload."""
    return FileFactory(owner=user, filename="held-out.jsonl", content=problems_jsonl(6))


@pytest.fixture
def two_adapters(user: Any, tiny_base_model: Any, make_adapter: Callable[..., Any]) -> list[Any]:
    return [
        make_adapter(user, tiny_base_model, seed=1, suffix="one"),
        make_adapter(user, tiny_base_model, seed=2, suffix="two"),
    ]
