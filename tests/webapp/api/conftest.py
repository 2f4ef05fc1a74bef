"""Fixtures for the REST API: a user with a bearer key and a lively tiny base."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from rest_framework.test import APIClient

from tests.factories import UserFactory, folder_base
from webapp.accounts.services import api_key_create


@pytest.fixture(scope="session")
def lively_base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny base whose greedy replies vary with the prompt (so adapters visibly differ)."""
    from tests.helpers.carry_on_kit import lively_base, save_hf_base

    return save_hf_base(lively_base(seed=5, name="lively"), tmp_path_factory.mktemp("lively"))


@pytest.fixture
def lively_base_model(db: None, lively_base_dir: Path) -> Any:
    """The lively base registered as the default BaseModel."""
    return folder_base(lively_base_dir, "lively")


@pytest.fixture(autouse=True)
def _fresh_engine() -> Iterator[None]:
    """Each test starts with no serving engine (and leaves no decode thread behind)."""
    from webapp.serving.engine import reset_engine

    reset_engine()
    yield
    reset_engine()


@pytest.fixture
def user(db: None) -> Any:
    return UserFactory()


def create_job(api: Any, **body: Any) -> Any:
    """POST /v1/fine_tuning/jobs with ``body`` as JSON."""
    return api.post("/v1/fine_tuning/jobs", body, format="json")


def openai_client(live_server: Any, user: Any, **kwargs: Any) -> Any:
    """The official ``openai`` client against the live server, with a fresh key of ``user``
    (no retries, so a test sees each answer; ``kwargs`` override)."""
    import openai

    _, raw = api_key_create(user=user)
    options: dict[str, Any] = {"max_retries": 0, "timeout": 300, **kwargs}
    return openai.OpenAI(base_url=f"{live_server.url}/v1", api_key=raw, **options)


def bearer_client(user: Any) -> APIClient:
    """An API client authenticated with a fresh key of ``user``."""
    _, raw = api_key_create(user=user, name="tests")
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {raw}")
    return client


@pytest.fixture
def api(user: Any) -> APIClient:
    return bearer_client(user)
