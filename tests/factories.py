"""factory_boy factories for the web platform's records.

Files go through the real upload service (stored, validated, counted), so a File made here
is exactly what an upload makes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import factory
from django.core.files.uploadedfile import SimpleUploadedFile
from django.test import Client
from factory.django import DjangoModelFactory

from tests.helpers.carry_on_kit import toy_jsonl
from webapp.accounts.models import ApiKey, User
from webapp.core.utils import data_path
from webapp.customizations.artifacts import write_bytes_atomic
from webapp.customizations.models import Adapter, Checkpoint, File, FineTuningJob, JobEvent

PASSWORD = "correct horse battery"


def signed_in(user: User) -> Client:
    """A browser client signed in as ``user`` (a factory user) through the login form's check."""
    client = Client()
    assert client.login(username=user.username, password=PASSWORD)
    return client


class UserFactory(DjangoModelFactory):
    class Meta:
        model = User

    username = factory.Sequence(lambda n: f"user{n}")
    email = factory.LazyAttribute(lambda u: f"{u.username}@example.com")
    password = factory.django.Password(PASSWORD)


class ApiKeyFactory(DjangoModelFactory):
    class Meta:
        model = ApiKey

    user = factory.SubFactory(UserFactory)
    prefix = factory.Sequence(lambda n: f"sk-co-{n:06d}")
    hashed_key = factory.Sequence(lambda n: f"{n:064x}")


class FileFactory(factory.Factory):
    """An uploaded dataset; ``content`` defaults to a valid 16-example chat file."""

    class Meta:
        model = File

    owner = factory.SubFactory(UserFactory)
    filename = "train.jsonl"
    content = factory.LazyFunction(lambda: toy_jsonl(16))

    @classmethod
    def _create(cls, model_class: type[File], **kwargs: Any) -> File:
        from webapp.customizations.services.files import file_create

        upload = SimpleUploadedFile(kwargs["filename"], kwargs["content"])
        return file_create(user=kwargs["owner"], upload=upload)


class FineTuningJobFactory(DjangoModelFactory):
    """A job row (no task is enqueued); use services.jobs.job_create to run the pipeline."""

    class Meta:
        model = FineTuningJob

    owner = factory.SubFactory(UserFactory)
    training_file = factory.SubFactory(FileFactory, owner=factory.SelfAttribute("..owner"))
    base = factory.LazyFunction(lambda: _default_base())
    hyperparameters = factory.LazyFunction(
        lambda: {"n_epochs": 1, "batch_size": 4, "learning_rate_multiplier": 2.0}
    )
    carry_on = factory.LazyFunction(lambda: _carry_on())
    seed = 0


def folder_base(
    folder: Path, name: str, *, fingerprint: dict[str, Any] | None = None, default: bool = True
) -> Any:
    """The HF folder ``folder`` registered as base ``name`` through the service (the default
    unless ``default`` is False); its fingerprint is read from the folder unless given."""
    from customization.base_model import load_base_model
    from webapp.customizations.services.base_models import base_model_register

    if fingerprint is None:
        fingerprint = load_base_model(folder, name=name).fingerprint().to_dict()
    return base_model_register(
        name=name,
        source=str(folder),
        source_type="folder",
        path=folder,
        fingerprint=fingerprint,
        default=default,
    )


def _default_base() -> Any:
    from webapp.customizations.models import BaseModel

    return BaseModel.objects.get(is_default=True)


def _carry_on() -> dict[str, Any]:
    from webapp.customizations.options import CARRY_ON

    # One tap keeps the tiny test carry-ons cheap; the default ladder has its own tests.
    return {
        **CARRY_ON.defaults,
        "d_model": 16,
        "n_heads": 2,
        "taps": [-1],
        "tap_mode": "mix",
        "max_length": 64,
    }


class JobEventFactory(DjangoModelFactory):
    class Meta:
        model = JobEvent

    job = factory.SubFactory(FineTuningJobFactory)
    message = "something happened"
    seq = factory.Sequence(int)


class CheckpointFactory(DjangoModelFactory):
    class Meta:
        model = Checkpoint

    job = factory.SubFactory(FineTuningJobFactory)
    step = factory.Sequence(lambda n: n + 1)
    path = factory.LazyAttribute(lambda c: f"jobs/{c.job.id}/checkpoints/step-{c.step:08d}")
    sha256 = "0" * 64


class AdapterFactory(DjangoModelFactory):
    """An adapter whose artifact is a small placeholder folder under DATA_DIR."""

    class Meta:
        model = Adapter
        skip_postgeneration_save = True

    job = factory.SubFactory(FineTuningJobFactory, status=FineTuningJob.Status.SUCCEEDED)
    owner = factory.SelfAttribute("job.owner")
    base = factory.SelfAttribute("job.base")
    name = factory.LazyAttribute(lambda a: f"ft:{a.base.name}:{a.owner.username}::{a.job.id}")
    path = factory.LazyAttribute(lambda a: f"adapters/{a.job.id}")
    sha256 = "0" * 64

    @factory.post_generation
    def artifact(obj: Adapter, create: bool, extracted: Any, **kwargs: Any) -> None:
        if create:
            write_bytes_atomic(data_path(obj.path) / "carry_on.safetensors", b"weights")


def tail_adapter(*, owner: User, depth: int = 2, preset: str = "balanced", **tail: Any) -> Adapter:
    """A succeeded tail job (the tail defaults with ``depth`` and ``tail``) and its adapter."""
    from webapp.customizations.options import TAIL

    job = FineTuningJobFactory(
        owner=owner,
        status=FineTuningJob.Status.SUCCEEDED,
        kind="tail",
        preset=preset,
        carry_on={},
        tail={**TAIL.defaults, "depth": depth, **tail},
    )
    return AdapterFactory(job=job, kind="tail", depth=depth, preset=preset)
