"""The loss curve SVG and the new-job time estimate."""

from __future__ import annotations

import json
import re

from webapp.customizations.charts import MAX_POINTS, loss_curve_svg
from webapp.customizations.estimates import duration_text, job_estimate

SMOLLM2 = {"hidden_size": 576, "num_layers": 30, "vocab_size": 49152}


def _points(n: int) -> list[dict[str, float]]:
    return [{"step": s, "train_loss": 3.0 / s} for s in range(1, n + 1)]


def test_no_points_draw_nothing() -> None:
    """Without metrics there is no curve (the page shows its empty state instead)."""
    assert loss_curve_svg([]) == ""


def test_the_curve_carries_its_points_and_a_text_summary() -> None:
    """data-points holds [step, train, valid]; the title says what the picture shows."""
    svg = str(loss_curve_svg([*_points(3)[:2], {"step": 3, "train_loss": 1.0, "valid_loss": 1.2}]))
    points = json.loads(re.search(r'data-points="([^"]*)"', svg)[1].replace("&quot;", '"'))
    assert points == [[1, 3.0, None], [2, 1.5, None], [3, 1.0, 1.2]]
    assert "<title" in svg
    assert "train loss 3.000 → 1.000" in svg
    assert svg.count("<polyline") == 2


def test_total_steps_fix_the_x_axis_so_the_curve_grows_from_the_left() -> None:
    """Mid-training, the last point sits where its step falls in the whole run."""
    svg = str(loss_curve_svg(_points(5), total_steps=100))
    assert 'data-total-steps="100"' in svg
    last_x = float(re.search(r'points="[^"]* ([\d.]+),[\d.]+"', svg)[1])
    assert last_x < 100  # step 5 of 100 is near the left edge


def test_long_runs_are_thinned_but_keep_their_last_point() -> None:
    """Thousands of steps draw at most MAX_POINTS points, ending at the last step."""
    svg = str(loss_curve_svg(_points(5000)))
    points = json.loads(re.search(r'data-points="([^"]*)"', svg)[1])
    assert len(points) == MAX_POINTS
    assert points[-1][0] == 5000


def test_the_estimate_grows_with_epochs_tokens_and_carry_on_size() -> None:
    """More epochs, more tokens or a bigger carry-on never take less time."""

    def estimate(**overrides: int) -> float:
        args = {"n_tokens": 10_000, "n_loss_tokens": 5_000, "epochs": 3, "d_model": 128,
                "n_blocks": 2, **overrides}  # fmt: skip
        return job_estimate(fingerprint=SMOLLM2, **args).seconds

    base = estimate()
    assert estimate(epochs=6) > base
    assert estimate(n_tokens=20_000, n_loss_tokens=10_000) > base
    assert estimate(d_model=512, n_blocks=8) > base


def test_durations_read_as_rounded_estimates() -> None:
    """Seconds to tens, minutes, then hours and minutes."""
    assert duration_text(3) == "10 seconds"
    assert duration_text(44) == "40 seconds"
    assert duration_text(61) == "1 minute"
    assert duration_text(150) == "2 minutes"
    assert duration_text(3 * 3600 + 20 * 60) == "3 h 20 min"
