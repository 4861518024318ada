"""The exponential moving average of parameters: warm-up, formula, buffers, bad decays."""

from __future__ import annotations

import pytest
import torch

from fedmm.common.parameter_averaging import average_parameters, warmed_up_decay


def test_the_decay_warms_up_then_stays_at_its_value() -> None:
    assert warmed_up_decay(0.99, 1) == pytest.approx(2 / 11)
    assert warmed_up_decay(0.99, 10) == pytest.approx(11 / 20)
    assert warmed_up_decay(0.9, 1000) == 0.9
    assert warmed_up_decay(0.0, 5) == 0.0


@pytest.mark.parametrize("decay", [-0.1, 1.0, 1.5])
def test_a_decay_outside_zero_one_is_refused(decay: float) -> None:
    with pytest.raises(ValueError, match="averaging decay"):
        warmed_up_decay(decay, 1)


def test_floats_are_averaged_and_integer_buffers_follow_the_current_model() -> None:
    averaged = {"w": torch.tensor([1.0, 2.0]), "count": torch.tensor(3)}
    current = {"w": torch.tensor([3.0, 6.0]), "count": torch.tensor(7)}
    out = average_parameters(averaged, current, decay=0.5, step=100)
    assert torch.equal(out["w"], torch.tensor([2.0, 4.0]))
    assert int(out["count"]) == 7
    assert out["w"] is not current["w"] and out["w"] is not averaged["w"]


def test_decay_zero_is_the_current_model_copied() -> None:
    current = {"w": torch.tensor([3.0, 6.0])}
    out = average_parameters({"w": torch.zeros(2)}, current, decay=0.0, step=3)
    assert torch.equal(out["w"], current["w"])
    current["w"] += 1  # a copy: later changes to the model do not reach the average
    assert torch.equal(out["w"], torch.tensor([3.0, 6.0]))
