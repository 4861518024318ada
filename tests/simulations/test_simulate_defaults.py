"""The defaults ``fedmm simulate`` applies: the built-in benchmark's and real data's."""

from __future__ import annotations

from pathlib import Path

from fedmm.simulations.cli import _simulation_config, build_parser


def _config(tmp_path: Path, *args: str):
    parsed = build_parser().parse_args(["simulate", "--out", str(tmp_path / "run"), *args])
    config, _out = _simulation_config(parsed)
    return config


def test_the_benchmark_holds_out_less_than_real_data_and_set_wins(tmp_path: Path) -> None:
    benchmark = _config(tmp_path)
    assert benchmark.eval_fraction == 0.05 and benchmark.image_size == "28x56"
    real = _config(tmp_path, "--site-data", str(tmp_path / "a"), str(tmp_path / "b"))
    assert real.eval_fraction == 0.2 and real.image_size == "64x64"  # the run config default
    chosen = _config(tmp_path, "--set", "eval-fraction=0.2")
    assert chosen.eval_fraction == 0.2


def test_the_benchmark_trains_the_scattering_readout_unless_an_encoder_is_named(
    tmp_path: Path,
) -> None:
    benchmark = _config(tmp_path)
    assert (benchmark.model_image_encoder, benchmark.model_image_layers) == ("scatter-linear", 0)
    assert benchmark.model_text_layers == 0
    assert (benchmark.max_grad_norm, benchmark.learning_rate) == (0.1, 16.0)
    tuned = _config(tmp_path, "--set", "learning-rate=8")
    assert tuned.model_image_encoder == "scatter-linear" and tuned.learning_rate == 8.0
    # An encoder of the user's own keeps the run config's recipe, not the readout's.
    patches = _config(tmp_path, "--set", "model-image-encoder=patches")
    assert (patches.model_image_layers, patches.model_text_layers) == (1, 1)
    assert (patches.max_grad_norm, patches.learning_rate) == (1.0, 4.0)
    real = _config(tmp_path, "--site-data", str(tmp_path / "a"), str(tmp_path / "b"))
    assert real.model_image_encoder == "patches"  # real data: the measured real-data recipe
