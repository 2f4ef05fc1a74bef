"""Fixtures shared by the web-platform and worker tests: a data directory, a tiny base, adapters."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from django.conf import settings

pytest_plugins = ["tests.helpers.celery_workers", "tests.helpers.servers"]

# Tests that need a real service; under CARRY_ON_REQUIRE_SERVICES=1 (.ci/run) a skip of one
# of them, whatever its reason, is a failure.
SERVICE_MARKERS = ("integration", "browser")


def pytest_sessionstart(session: pytest.Session) -> None:
    from tests.helpers.services import REQUIRE_ENV, services_required

    if services_required() and not os.environ.get("DATABASE_URL", "").startswith("postgres"):
        raise pytest.UsageError(f"{REQUIRE_ENV}=1 needs DATABASE_URL=postgres://...")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    from tests.helpers.services import REQUIRE_ENV, services_required

    outcome = yield
    report = outcome.get_result()
    if not (report.skipped and services_required()) or hasattr(report, "wasxfail"):
        return
    if any(item.get_closest_marker(name) for name in SERVICE_MARKERS):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        report.outcome = "failed"
        report.longrepr = f"skipped under {REQUIRE_ENV}=1 (must run in CI): {reason}"


@pytest.fixture(autouse=True)
def _empty_usage_buffer() -> Iterator[None]:
    """Chats buffer usage records in this process (webapp/usage); a test's records are
    written in its own test, or not at all: never into the next test's database, nor at
    exit, after the test databases are gone."""
    from webapp.usage.services import usage_buffer

    usage_buffer.discard()
    yield
    usage_buffer.discard()


@pytest.fixture
def data_dir(settings: Any, tmp_path: Path) -> Path:
    """A fresh DATA_DIR for the test: uploads, features, checkpoints and adapters."""
    folder = tmp_path / "data"
    folder.mkdir()
    settings.DATA_DIR = folder
    return folder


@pytest.fixture
def one_torch_thread(settings: Any) -> Iterator[None]:
    """Eager tasks train tiny models in this process: intra-op threads only slow them down."""
    import torch

    from webapp.core.runtime import warm_up

    settings.CARRY_ON = {**settings.CARRY_ON, "TORCH_THREADS": 1}
    previous = torch.get_num_threads()
    warm_up()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def quick_heartbeat(settings: Any) -> None:
    """Heartbeats (and cancel checks) on every callback instead of every few seconds."""
    settings.CARRY_ON = {**settings.CARRY_ON, "HEARTBEAT_INTERVAL": 0}


@pytest.fixture
def fsynced(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Every path os.fsync is called on during the test, in order (the real fsync still runs;
    naming the fd needs /proc)."""
    synced: list[Path] = []
    real = os.fsync

    def fsync(fd: int) -> None:
        synced.append(Path(os.readlink(f"/proc/self/fd/{fd}")))
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    return synced


@pytest.fixture(scope="session")
def tiny_base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama with a byte-level ChatML tokenizer, saved as an HF folder."""
    from tests.helpers.carry_on_kit import save_hf_base
    from tests.helpers.tiny_models import tiny_base

    return save_hf_base(tiny_base(seed=0, name="tiny"), tmp_path_factory.mktemp("tiny-base"))


@pytest.fixture(scope="session")
def tiny_base_fingerprint(tiny_base_dir: Path) -> dict[str, Any]:
    from customization.base_model import load_base_model

    return load_base_model(tiny_base_dir, name="tiny").fingerprint().to_dict()


@pytest.fixture
def tiny_base_model(db: None, tiny_base_dir: Path, tiny_base_fingerprint: dict[str, Any]) -> Any:
    """The tiny base registered as the default BaseModel."""
    from tests.factories import folder_base

    return folder_base(tiny_base_dir, "tiny", fingerprint=tiny_base_fingerprint)


@pytest.fixture
def smollm2(db: None) -> Any:
    """The real bundled base, registered as the default (skipped where it is not prepared)."""
    from customization.base_model import BUNDLED_NAME, load_base_model
    from webapp.customizations.services.base_models import base_model_register

    folder = Path(settings.MODELS_DIR) / BUNDLED_NAME
    if not (folder / "model.safetensors").is_file():
        pytest.skip("the bundled base is not prepared (manage.py prepare_base_model)")
    fingerprint = load_base_model(folder, name=BUNDLED_NAME).fingerprint().to_dict()
    return base_model_register(
        name=BUNDLED_NAME,
        source="bundled",
        source_type="bundled",
        path=folder,
        fingerprint=fingerprint,
        default=True,
    )


@pytest.fixture
def make_adapter(settings: Any) -> Callable[..., Any]:
    """A real carry-on artifact for a base, registered as an adapter of ``owner``."""

    def make(owner: Any, base: Any, *, seed: int, suffix: str = "") -> Any:
        from customization.base_model import load_base_model
        from customization.checkpoint import save_carry_on
        from tests.factories import FineTuningJobFactory
        from tests.helpers.carry_on_kit import new_carry_on, perturb, tiny_config
        from webapp.core.utils import data_path
        from webapp.customizations.models import Adapter, FineTuningJob

        frozen = load_base_model(base.path, name=base.name)
        carry_on = perturb(new_carry_on(frozen, tiny_config(), seed=seed), seed=seed)
        job = FineTuningJobFactory(
            owner=owner, base=base, suffix=suffix, status=FineTuningJob.Status.SUCCEEDED
        )
        relative = f"adapters/{job.id}"
        info = save_carry_on(
            carry_on, data_path(relative), base_fingerprints=[frozen.fingerprint()]
        )
        return Adapter.objects.create(
            name=job.model_name, owner=owner, base=base, job=job, path=relative,
            sha256=info.sha256, bytes=info.nbytes, n_parameters=info.num_parameters,
        )  # fmt: skip

    return make
