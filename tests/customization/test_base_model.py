from pathlib import Path

import pytest
import torch

from customization.base_model import BaseFingerprint, FrozenBase, load_base_model
from customization.errors import BaseModelNotFoundError, IncompatibleBaseModelError
from tests.helpers.carry_on_kit import lively_base
from tests.helpers.tiny_models import tiny_base


def _ids(base: FrozenBase, *texts: str) -> torch.Tensor:
    rows = [base.tokenizer.encode(text) for text in texts]
    width = min(len(row) for row in rows)
    return torch.tensor([row[:width] for row in rows])


def test_lm_head_of_final_hidden_state_equals_llama_logits() -> None:
    """For Llama, hidden_states[-1] is already normed: lm_head(it) is the model's logits."""
    base = tiny_base(seed=3)
    ids = _ids(base, "The carry-on rides along.", "A frozen base, shared by all.")
    (final,) = base.hidden_states(ids, None, [-1])
    with torch.inference_mode():
        logits = base.model(input_ids=ids).logits
    assert final.shape == (*ids.shape, base.hidden_size)
    torch.testing.assert_close(base.logits(final), logits, rtol=0, atol=1e-6)


def test_every_base_parameter_is_frozen(base: FrozenBase) -> None:
    """Wrapping a model in FrozenBase turns off gradients for all its parameters."""
    assert all(not p.requires_grad for p in base.model.parameters())
    assert not base.model.training


def test_hidden_states_at_taps_match_the_model_outputs(base: FrozenBase) -> None:
    """Taps 0, 1 and -1 are hidden_states[0], [1] and [num_layers] of the backbone."""
    ids = _ids(base, "tap me")
    with torch.inference_mode():
        expected = base.backbone(input_ids=ids, output_hidden_states=True).hidden_states
    taps = base.hidden_states(ids, None, [0, 1, -1])
    for tap, index in zip(taps, [0, 1, base.num_layers], strict=True):
        assert torch.equal(tap, expected[index])


def test_states_recorded_by_hooks_equal_transformers_hidden_states(base: FrozenBase) -> None:
    """``backbone_forward(states=True)`` records what ``output_hidden_states`` returns, bit
    for bit, and takes its hooks off again; without ``states`` it asks for none."""
    ids = _ids(base, "record every state", "and leave no hook")
    with torch.inference_mode():
        expected = base.backbone(input_ids=ids, output_hidden_states=True).hidden_states
        recorded = base.backbone_forward(states=True, input_ids=ids).hidden_states
        plain = base.backbone_forward(input_ids=ids)
    assert len(recorded) == len(expected) == base.num_layers + 1
    assert all(torch.equal(a, b) for a, b in zip(recorded, expected, strict=True))
    assert plain.hidden_states is None
    layers = base.backbone.layers
    assert not any(layer._forward_hooks or layer._forward_pre_hooks for layer in layers)


def test_only_the_asked_states_are_recorded(base: FrozenBase) -> None:
    """``backbone_forward(states={...})`` records just those indices (the embeddings, a
    layer's output) and the final normed state, each equal to transformers' own, None
    elsewhere; hooks go only where a state is asked for, and come off again."""
    ids = _ids(base, "record a few states")
    layers = base.backbone.layers
    hooked: list[int] = []
    originals = [layer.register_forward_hook for layer in layers]
    for index, layer in enumerate(layers):

        def counting(*args: object, _index: int = index, **kwargs: object) -> object:
            hooked.append(_index)
            return originals[_index](*args, **kwargs)

        layer.register_forward_hook = counting  # type: ignore[method-assign]
    try:
        with torch.inference_mode():
            expected = base.backbone(input_ids=ids, output_hidden_states=True).hidden_states
            for asked in ({1}, {0, base.num_layers}, {base.num_layers}):
                recorded = base.backbone_forward(states=asked, input_ids=ids).hidden_states
                assert len(recorded) == base.num_layers + 1
                for index, state in enumerate(recorded):
                    if index in asked or index == base.num_layers:
                        assert torch.equal(state, expected[index])
                    else:
                        assert state is None
    finally:
        for layer in layers:
            del layer.register_forward_hook
    assert hooked == [0]  # state 1 is layer 0's output; 0 and the last need no hook
    assert not any(layer._forward_hooks or layer._forward_pre_hooks for layer in layers)


def test_resolve_tap_counts_negative_taps_from_the_end(base: FrozenBase) -> None:
    """-1 is the final state; taps outside [-(L+1), L] are refused."""
    assert base.resolve_tap(-1) == base.num_layers == 2
    assert base.resolve_tap(-3) == 0
    assert base.resolve_tap(1) == 1
    for tap in (3, -4):
        with pytest.raises(ValueError, match=f"tap {tap}"):
            base.resolve_tap(tap)


def test_fingerprint_is_stable_for_equal_bases_and_differs_for_other_weights(
    base: FrozenBase, other_base: FrozenBase
) -> None:
    """Same weights give the same key; another LM head gives another key."""
    again = tiny_base(seed=0)
    assert again.fingerprint().key == tiny_base(seed=0).fingerprint().key
    assert base.fingerprint().key != other_base.fingerprint().key
    assert BaseFingerprint.from_dict(base.fingerprint().to_dict()) == base.fingerprint()


def test_check_compatible_names_the_differences(base: FrozenBase, other_base: FrozenBase) -> None:
    """A mismatch names both bases and what differs."""
    with pytest.raises(IncompatibleBaseModelError, match="LM head weights") as caught:
        base.fingerprint().check_compatible(other_base.fingerprint())
    assert "'other'" in caught.value.message
    assert "'tiny'" in caught.value.message
    assert caught.value.param == "model"
    base.fingerprint().check_compatible(base.fingerprint())


def test_malformed_fingerprint_is_refused() -> None:
    """A fingerprint record with missing fields is an IncompatibleBaseModelError."""
    with pytest.raises(IncompatibleBaseModelError, match="malformed"):
        BaseFingerprint.from_dict({"name": "x"})


def test_load_base_model_from_an_hf_folder(hf_base_dir: Path) -> None:
    """A saved HF folder loads frozen, with its tokenizer and the saved model's fingerprint."""
    loaded = load_base_model(hf_base_dir)
    original = lively_base(seed=2)
    assert loaded.name == "tiny-llama"
    assert loaded.fingerprint().key == original.fingerprint().key
    assert all(not p.requires_grad for p in loaded.model.parameters())
    assert loaded.tokenizer.eos_token_id == original.tokenizer.eos_token_id


def test_load_base_model_reports_a_missing_source(tmp_path: Path) -> None:
    """A missing GGUF file or empty folder is a BaseModelNotFoundError."""
    with pytest.raises(BaseModelNotFoundError, match="does not exist"):
        load_base_model(tmp_path / "missing.gguf")
    with pytest.raises(BaseModelNotFoundError, match="cannot load base model"):
        load_base_model(tmp_path)
