"""The one-site lever screen runs the site's DP-SGD on the benchmark's model and reports it."""

from __future__ import annotations

import json
import sys

import pytest

from fedmm.common.data.fashion_mnist import DEFAULT_DATA_DIR
from fedmm.simulations.benchmarks import site_dp_levers

pytestmark = pytest.mark.skipif(
    not DEFAULT_DATA_DIR.exists(), reason="needs apt-get install dataset-fashion-mnist"
)


def test_a_tiny_screen_reports_calibrated_noise_and_accuracy(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["site_dp_levers", "--records", "300", "--epochs", "3", "--test-items", "40"]
    monkeypatch.setattr(sys, "argv", [*argv, "--set", "model-text-layers=0"])
    site_dp_levers.main()
    report = json.loads(capsys.readouterr().out)
    assert report["set"] == {"model-text-layers": "0"}
    assert report["noise_multiplier"] > 0.5  # calibrated to epsilon 3, not DP off
    assert [epoch for epoch, _ in report["accuracy_by_epoch"]] == [3]
    assert all(0.0 <= accuracy <= 1.0 for _, accuracy in report["accuracy_by_epoch"])
