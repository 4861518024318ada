"""Argument parsers shared by the ``fedmm`` commands: numbers, epsilons, KEY=VALUE pairs,
and how a command reports an input the user must fix (exit code 2)."""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable

from fedmm.common.federation_config import ConfigError
from fedmm.common.flower_commands import FlowerCommandNotFoundError

#: The exit code of a command given an input the user must fix.
USER_ERROR = 2


def report_user_error(prefix: str, message: str) -> int:
    """Print ``prefix: message`` on stderr; returns :data:`USER_ERROR`."""
    print(f"{prefix}: {message}", file=sys.stderr)
    return USER_ERROR


#: A command step: its parsed arguments in, its exit code out.
StepHandler = Callable[[argparse.Namespace], int]


def run_step(args: argparse.Namespace, *, command: str) -> int:
    """Run the handler the step's parser set (``set_defaults(handler=...)``). An input the
    user must fix (``ValueError``, a Flower command not installed) is printed naming
    ``fedmm <command> <step>``, each of its ``problems`` on a line when it lists them;
    exit 2."""
    handler: StepHandler = args.handler
    prefix = f"fedmm {command} {args.step}"
    try:
        return handler(args)
    except (ValueError, FlowerCommandNotFoundError) as err:
        problems = getattr(err, "problems", None)
        if problems:
            lines = "\n".join(f"  - {problem}" for problem in problems)
            return report_user_error(prefix, f"{getattr(err, 'path', '')} has problems:\n{lines}")
        return report_user_error(prefix, str(err))


def number(text: str) -> float:
    """A float option; a clear argparse error when ``text`` is not a number."""
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None


def epsilon(text: str) -> float:
    """An epsilon option: > 0, or inf for no DP."""
    value = number(text)
    if not (value > 0 or math.isinf(value)):
        raise argparse.ArgumentTypeError("epsilon must be > 0, or inf for no DP")
    return value


def key_value_pairs(pairs: list[str], *, option: str) -> dict[str, str]:
    """``KEY=VALUE`` strings of ``option`` as a dict; ConfigError names the option."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"{option} expects KEY=VALUE, got {pair!r}")
        out[key.strip()] = value.strip()
    return out
