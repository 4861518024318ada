"""The argument parsers ``fedmm simulate`` and ``fedmm privacy-sweep`` share."""

from __future__ import annotations

import argparse
import math

import pytest

from fedmm.common.cli_arguments import epsilon, key_value_pairs
from fedmm.common.federation_config import ConfigError
from fedmm.simulations.cli import build_parser


def test_epsilon_takes_positive_numbers_and_inf() -> None:
    assert epsilon("3") == 3.0 and math.isinf(epsilon("inf"))
    for bad, message in (("0", "epsilon must be > 0"), ("-1", "epsilon must be > 0"),
                         ("three", "not a number: 'three'")):  # fmt: skip
        with pytest.raises(argparse.ArgumentTypeError, match=message):
            epsilon(bad)


def test_key_value_pairs_name_the_option_of_a_bad_pair() -> None:
    assert key_value_pairs(["a=1", " b = x=y "], option="--set") == {"a": "1", "b": "x=y"}
    for bad in ("novalue", "=1", " =1"):
        with pytest.raises(ConfigError, match="--set-overfit expects KEY=VALUE"):
            key_value_pairs([bad], option="--set-overfit")


def test_both_commands_use_them(capsys: pytest.CaptureFixture[str]) -> None:
    for command in (["simulate", "--epsilon", "x"], ["privacy-sweep", "--epsilons", "x"]):
        with pytest.raises(SystemExit):
            build_parser().parse_args(command)
        assert "not a number: 'x'" in capsys.readouterr().err
