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
