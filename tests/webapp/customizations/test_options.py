"""The job options are declared once: a new config field is offered and accepted everywhere."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
from rest_framework.test import APIClient

from customization.config import CarryOnConfig
from tests.factories import FileFactory, UserFactory
from webapp.customizations import options
from webapp.customizations.forms import EstimateQuery, JobCreateForm

pytestmark = pytest.mark.django_db


@dataclasses.dataclass(frozen=True)
class _WiderCarryOnConfig(CarryOnConfig):
    """The carry-on's config with one more field, as a future version might add it."""

    warmup_blocks: int = dataclasses.field(
        default=0,
        metadata={"option": {"help": "Blocks kept frozen at first", "low": 0, "high": 8}},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 <= self.warmup_blocks <= 8:
            raise ValueError(f"warmup_blocks must be in [0, 8], got {self.warmup_blocks}")


@pytest.fixture
def wider(monkeypatch: pytest.MonkeyPatch) -> options.KindOptions:
    registry = options.kind_options("carry_on", _WiderCarryOnConfig)
    monkeypatch.setattr(options, "CARRY_ON", registry)
    return registry


def test_a_new_config_field_is_an_option_with_its_default_and_bounds(
    wider: options.KindOptions,
) -> None:
    """The field's default, type and bounds come from the dataclass and its metadata."""
    option = wider.options["warmup_blocks"]
    assert (option.default, option.types, option.low, option.high) == (0, (int,), 0, 8)
    assert options.options_of("carry_on").defaults["warmup_blocks"] == 0
    assert "warmup_blocks" in wider.shape_keys


def test_a_new_config_field_is_accepted_by_the_api(
    wider: options.KindOptions, tiny_base_model: Any
) -> None:
    """POST /v1/fine_tuning/jobs stores it; a value out of its range is a 400 naming it."""
    user = UserFactory()
    file = FileFactory(owner=user)
    client = APIClient()
    client.force_authenticate(user)
    body = {"training_file": file.id, "model": tiny_base_model.name}
    good = client.post(
        "/v1/fine_tuning/jobs", {**body, "carry_on": {"warmup_blocks": 2}}, format="json"
    )
    assert good.status_code == 200, good.json()
    assert good.json()["carry_on"]["warmup_blocks"] == 2
    bad = client.post(
        "/v1/fine_tuning/jobs", {**body, "carry_on": {"warmup_blocks": 9}}, format="json"
    )
    assert bad.status_code == 400
    assert "warmup_blocks must be in [0, 8]" in bad.json()["error"]["message"]


def test_a_new_config_field_is_accepted_by_the_form(
    wider: options.KindOptions, tiny_base_model: Any
) -> None:
    """The job form offers it with the carry-on's fields and passes it to the service."""
    user = UserFactory()
    file = FileFactory(owner=user)
    data = {
        "training_file": file.id,
        "model": tiny_base_model.name,
        "preset": "custom",
        "kind": "carry_on",
        "warmup_blocks": "3",
    }
    form = JobCreateForm(data, user=user)
    assert form.is_valid(), form.errors
    assert form.carry_on() == {"warmup_blocks": 3}
    legends = {legend: [field.name for field in fields] for legend, fields, _ in form.fieldsets()}
    assert "warmup_blocks" in legends["Carry-on size and taps"]
    too_many = JobCreateForm({**data, "warmup_blocks": "9"}, user=user)
    assert not too_many.is_valid()
    assert "warmup_blocks" in too_many.errors


def test_a_new_config_field_is_accepted_by_the_estimate(wider: options.KindOptions) -> None:
    """The estimate's query takes it, checked against the same bounds."""
    query = EstimateQuery({"training_file": "file-x", "warmup_blocks": "4"})
    assert query.is_valid(), query.errors
    assert query.options() == {"warmup_blocks": 4}
    assert not EstimateQuery({"training_file": "file-x", "warmup_blocks": "9"}).is_valid()
