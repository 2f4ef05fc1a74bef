"""Presets and tail options on job creation: the kind, the defaults, overrides and each 400."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path
from typing import Any

import pytest
from django.utils.html import escape

from customization.presets import PRESETS
from tests.factories import (
    AdapterFactory,
    FileFactory,
    FineTuningJobFactory,
    UserFactory,
    signed_in,
    tail_adapter,
)
from webapp.core.exceptions import ApplicationError
from webapp.core.utils import data_path
from webapp.customizations.artifacts import write_bytes_atomic
from webapp.customizations.estimates import job_estimate, tail_job_estimate
from webapp.customizations.models import BaseModel, FineTuningJob
from webapp.customizations.options import CARRY_ON, TAIL, tail_parameters
from webapp.customizations.services.jobs import job_create

pytestmark = pytest.mark.django_db
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture
def deep_base(tiny_base_model: Any, tmp_path: Path) -> BaseModel:
    """A 30-layer base record shaped like the bundled SmolLM2 (its config.json, no weights)."""
    folder = tmp_path / "deep"
    folder.mkdir()
    (folder / "config.json").write_text(
        '{"hidden_size": 576, "intermediate_size": 1536, "num_attention_heads": 9,'
        ' "num_key_value_heads": 3, "head_dim": 64, "num_hidden_layers": 30}'
    )
    return BaseModel.objects.create(
        name="deep",
        source_type="folder",
        source=str(folder),
        path=str(folder),
        fingerprint={"num_layers": 30, "hidden_size": 576, "vocab_size": 49152},
        fingerprint_key="deep",
    )


def _create(**arguments: Any) -> FineTuningJob:
    user = UserFactory()
    return job_create(user=user, training_file=FileFactory(owner=user).id, **arguments)


BALANCED_DEPTH = PRESETS["balanced"].options["depth"]


@pytest.mark.parametrize(
    ("preset", "kind", "depth"), [("fast", "carry_on", None), ("balanced", "tail", BALANCED_DEPTH)]
)
def test_a_preset_sets_the_kind_and_fills_its_defaults(
    deep_base: BaseModel, preset: str, kind: str, depth: int | None
) -> None:
    """fast is the default carry-on, balanced a tail of its benchmarked depth (fewer layers
    than the 30-layer base) with the tail defaults."""
    assert BALANCED_DEPTH < 30
    job = _create(model="deep", preset=preset)
    assert (job.kind, job.preset) == (kind, preset)
    if kind == "tail":
        assert job.carry_on == {}
        assert job.tail == {**TAIL.defaults, "depth": depth}
        assert job.tail["target_modules"] == ALL_LINEAR
    else:
        assert job.tail == {}
        assert job.carry_on["d_model"] == CARRY_ON.defaults["d_model"]


def test_the_best_preset_clamps_its_depth_to_the_base(deep_base: BaseModel) -> None:
    """best is a tail over every layer: its depth becomes the base's layer count."""
    assert _create(model="deep", preset="best").tail["depth"] == 30
    assert _create(preset="best").tail["depth"] == 2  # the two-layer tiny base


def test_a_presets_depth_clamps_on_a_shallow_base(tiny_base_model: Any) -> None:
    """balanced's depth becomes 2 on a two-layer base rather than an error."""
    assert _create(preset="balanced").tail["depth"] == 2


def test_options_given_with_a_preset_win(deep_base: BaseModel) -> None:
    """Explicit tail options override the preset's; the preset name is kept."""
    job = _create(
        model="deep",
        preset="best",
        tail={"depth": 4, "rank": 16, "target_modules": ["q_proj", "v_proj"]},
    )
    assert (job.kind, job.preset) == ("tail", "best")
    assert (job.tail["depth"], job.tail["rank"]) == (4, 16)
    assert job.tail["target_modules"] == ["q_proj", "v_proj"]
    fast = _create(model="deep", preset="fast", carry_on={"d_model": 64})
    assert (fast.kind, fast.carry_on["d_model"]) == ("carry_on", 64)


def test_tail_options_alone_make_a_tail_job(deep_base: BaseModel) -> None:
    """Without a preset, tail options choose the tail kind with TailConfig's defaults."""
    job = _create(model="deep", tail={"rank": 4, "target_modules": "all-linear"})
    assert (job.kind, job.preset, job.carry_on) == ("tail", "", {})
    assert job.tail == {**TAIL.defaults, "rank": 4}


def test_a_job_with_no_options_is_a_carry_on_with_no_tail(tiny_base_model: Any) -> None:
    """No preset and no options: a carry-on, as before the tail existed."""
    job = _create()
    assert (job.kind, job.preset, job.tail) == ("carry_on", "", {})
    assert job.carry_on["n_blocks"] == CARRY_ON.defaults["n_blocks"]


@pytest.mark.parametrize(
    ("arguments", "param"),
    [
        ({"preset": "turbo"}, "preset"),
        ({"carry_on": {"d_model": 64}, "tail": {"rank": 4}}, "tail"),
        ({"preset": "fast", "tail": {"depth": 2}}, "tail"),
        ({"preset": "balanced", "carry_on": {"d_model": 64}}, "carry_on"),
        ({"tail": "deep"}, "tail"),
        ({"tail": {"wings": 2}}, "tail.wings"),
        ({"tail": {"depth": 31}}, "tail.depth"),
        ({"preset": "best", "tail": {"depth": 31}}, "tail.depth"),
        ({"tail": {"depth": 0}}, "tail.depth"),
        ({"tail": {"depth": "8"}}, "tail.depth"),
        ({"tail": {"rank": 0}}, "tail.rank"),
        ({"tail": {"rank": 4.5}}, "tail.rank"),
        ({"tail": {"alpha": 0}}, "tail.alpha"),
        ({"tail": {"dropout": 0.95}}, "tail.dropout"),
        ({"tail": {"target_modules": []}}, "tail.target_modules"),
        ({"tail": {"target_modules": ["lm_head"]}}, "tail.target_modules"),
        ({"tail": {"target_modules": ["q_proj", "q_proj"]}}, "tail.target_modules"),
        ({"tail": {"target_modules": "q_proj"}}, "tail.target_modules"),
        ({"tail": {"storage_dtype": "bfloat16"}}, "tail.storage_dtype"),
        ({"tail": {"max_length": -1}}, "tail.max_length"),
        ({"tail": {"max_length": 4}}, "tail.max_length"),
        ({"tail": {"checkpoint_every": "often"}}, "tail.checkpoint_every"),
        ({"tail": {"early_stopping_patience": 101}}, "tail.early_stopping_patience"),
    ],
)
def test_a_bad_preset_or_tail_option_is_a_400_naming_it(
    deep_base: BaseModel, arguments: dict[str, Any], param: str
) -> None:
    """Each wrong preset, kind mix or tail option is refused with its param; nothing is kept."""
    with pytest.raises(ApplicationError) as caught:
        _create(model="deep", **arguments)
    assert (caught.value.param, caught.value.status) == (param, 400), caught.value.message
    assert not FineTuningJob.objects.exists()


def test_tail_parameters_count_lora_on_every_target_module(deep_base: BaseModel) -> None:
    """depth × Σ rank × (in + out), with the base's own projection shapes (GQA included)."""
    one = {"depth": 1, "rank": 1, "target_modules": ALL_LINEAR}
    per_layer = (576 + 576) * 2 + (576 + 192) * 2 + (576 + 1536) * 2 + (1536 + 576)
    assert tail_parameters(one, deep_base) == per_layer
    assert tail_parameters({**one, "depth": 30, "rank": 8}, deep_base) == 30 * 8 * per_layer


def test_a_tail_above_the_parameter_ceiling_is_refused(deep_base: BaseModel, settings: Any) -> None:
    """The carry-on's size ceiling holds for tails too, before any worker runs out of memory."""
    settings.CARRY_ON = {**settings.CARRY_ON, "MAX_CARRY_ON_PARAMETERS": 1_000_000}
    with pytest.raises(ApplicationError) as caught:
        _create(model="deep", preset="best", tail={"rank": 64})
    assert (caught.value.param, caught.value.code) == ("tail", "tail_too_large")
    assert _create(model="deep", tail={"depth": 2, "rank": 4}).kind == "tail"


# -- the browser side: the form, the estimate, the pages, the download, the admin ----------


def test_the_job_form_offers_each_preset_with_its_summary_and_estimate(
    tiny_base_model: Any,
) -> None:
    """Every preset is a radio button with its summary and its own time estimate."""
    user = UserFactory()
    file = FileFactory(owner=user)
    html = signed_in(user).get(f"/jobs/new/?training_file={file.id}").content.decode()
    for name, preset in PRESETS.items():
        assert f'name="preset" value="{name}"' in html
        assert escape(preset.summary) in html
        assert f'data-preset-estimate="{name}">about ' in html
    assert 'value="custom"' in html


@pytest.mark.parametrize(
    ("fields", "kind", "preset", "tail"),
    [
        ({"preset": "balanced"}, "tail", "balanced", {"depth": 2, "rank": 8}),
        ({"preset": "best", "rank": "4"}, "tail", "best", {"depth": 2, "rank": 4}),
        (
            {"preset": "custom", "kind": "tail", "depth": "1", "rank": "16"},
            "tail",
            "",
            {"depth": 1, "rank": 16},
        ),
        ({"preset": "fast", "d_model": "64"}, "carry_on", "fast", {}),
        ({"preset": "custom", "kind": "carry_on"}, "carry_on", "", {}),
    ],
)
def test_the_job_form_starts_the_chosen_preset_or_custom_kind(
    tiny_base_model: Any,
    django_capture_on_commit_callbacks: Any,
    fields: dict[str, str],
    kind: str,
    preset: str,
    tail: dict[str, int],
) -> None:
    """The posted preset (or Custom with its kind, depth and rank) becomes the job's."""
    user = UserFactory()
    file = FileFactory(owner=user)
    with django_capture_on_commit_callbacks(execute=False):
        response = signed_in(user).post(
            "/jobs/new/", {"training_file": file.id, "model": "tiny", **fields}
        )
    assert response.status_code == 302, response.content.decode()[-2000:]
    job = FineTuningJob.objects.get()
    assert (job.kind, job.preset) == (kind, preset)
    assert {k: job.tail[k] for k in tail} == tail
    assert bool(job.carry_on) == (kind == "carry_on")


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"preset": "balanced", "d_model": "64"}, "This option is for a carry-on"),
        ({"preset": "fast", "depth": "1"}, "This option is for a tail"),
        ({"preset": "custom", "kind": "tail", "depth": "3"}, "the depth is at most 2"),
    ],
)
def test_the_job_form_refuses_options_that_do_not_fit(
    tiny_base_model: Any, fields: dict[str, str], message: str
) -> None:
    """Options of the other kind, or a depth beyond the base, are form errors: no job."""
    user = UserFactory()
    file = FileFactory(owner=user)
    response = signed_in(user).post(
        "/jobs/new/", {"training_file": file.id, "model": "tiny", **fields}
    )
    assert response.status_code == 400
    assert message in response.content.decode()
    assert not FineTuningJob.objects.exists()


def test_a_tails_estimate_grows_with_its_depth() -> None:
    """More tail layers cost more; a full-depth tail costs more than the carry-on."""
    fingerprint = {"hidden_size": 576, "num_layers": 30, "vocab_size": 49152}
    common = {"n_tokens": 6000, "n_loss_tokens": 3000, "fingerprint": fingerprint, "epochs": 1}
    layer = 2 * 576 * 576 + 2 * 576 * 192 + 3 * 576 * 1536
    depths = [tail_job_estimate(**common, depth=d, layer_units=layer).seconds for d in (1, 8, 30)]
    assert depths == sorted(depths)
    assert depths[0] < depths[1] < depths[2]
    carry_on = job_estimate(**common, d_model=128, n_blocks=2).seconds
    assert carry_on < depths[2]


def test_the_estimate_endpoint_answers_for_the_kind_and_every_preset(
    deep_base: BaseModel,
) -> None:
    """best takes longer than balanced, which takes longer than fast; each preset is told."""
    user = UserFactory()
    file = FileFactory(owner=user)
    client = signed_in(user)

    def seconds(**query: Any) -> float:
        body = client.get("/jobs/estimate/", {"training_file": file.id, **query}).json()
        assert set(body["presets"]) == set(PRESETS)
        return float(body["seconds"])

    fast, balanced, best = (seconds(model="deep", preset=p) for p in ("fast", "balanced", "best"))
    assert fast < balanced < best
    custom = seconds(model="deep", preset="custom", kind="tail", depth=BALANCED_DEPTH)
    assert custom == balanced


def test_job_and_adapter_pages_show_kind_depth_and_preset(tiny_base_model: Any) -> None:
    """The job page and the adapter list name the kind, the tail depth and the preset."""
    user = UserFactory()
    job = tail_adapter(owner=user).job
    client = signed_in(user)
    page = " ".join(client.get(f"/jobs/{job.id}/").content.decode().split())
    assert "tail · preset balanced" in page
    assert "depth 2 (LoRA on the top 2 layers) · rank 8" in page
    listing = " ".join(client.get("/adapters/").content.decode().split())
    assert "tail<br><small>depth 2</small><br><small>preset balanced</small>" in listing


def test_a_tail_adapter_downloads_as_a_zip_of_its_whole_folder(tiny_base_model: Any) -> None:
    """The bundle of a tail holds the PEFT folder's files and our metadata, nested ones too."""
    user = UserFactory()
    adapter = AdapterFactory(job=FineTuningJobFactory(owner=user), kind="tail", depth=2)
    folder = data_path(adapter.path)
    (folder / "carry_on.safetensors").unlink()  # the factory's carry-on placeholder
    names = ["adapter_config.json", "adapter_model.safetensors", "carry_on_tail.json"]
    for name in [*names, "extra/README.md"]:
        write_bytes_atomic(folder / name, name.encode())
    response = signed_in(user).get(f"/adapters/{adapter.pk}/download/")
    assert response.status_code == 200
    with zipfile.ZipFile(io.BytesIO(b"".join(response.streaming_content))) as bundle:
        assert sorted(bundle.namelist()) == sorted([*names, "extra/README.md"])
        assert bundle.read("adapter_config.json") == b"adapter_config.json"
    (folder / "adapter_model.safetensors").unlink()
    assert signed_in(user).get(f"/adapters/{adapter.pk}/download/").status_code == 404


def test_the_admin_lists_show_kind_depth_and_preset(tiny_base_model: Any) -> None:
    """Jobs and adapters list their kind and preset (adapters their depth) and filter by kind."""
    admin = UserFactory(is_staff=True, is_superuser=True)
    job = FineTuningJobFactory(
        status="succeeded", kind="tail", preset="best", carry_on={}, tail=dict(TAIL.defaults)
    )
    AdapterFactory(job=job, kind="tail", depth=7, preset="best")
    client = signed_in(admin)
    jobs = client.get("/admin/customizations/finetuningjob/?kind=tail").content.decode()
    assert 'column-kind"' in jobs
    assert 'column-preset"' in jobs
    assert '<td class="field-kind">tail</td>' in jobs
    assert '<td class="field-preset">best</td>' in jobs
    adapters = client.get("/admin/customizations/adapter/?kind=tail").content.decode()
    for column in ("kind", "depth", "preset"):
        assert f'column-{column}"' in adapters
    assert '<td class="field-depth">7</td>' in adapters
    empty = client.get("/admin/customizations/adapter/?kind=carry_on").content.decode()
    assert '<td class="field-depth">' not in empty
