"""One site's DP-SGD on the built-in benchmark: a quick proxy to screen a recipe's levers.

Trains the caption model alone on the first ``--records`` benchmark records (one site's
share of the default run), with the site's own DP-SGD (``client.training.train_locally``:
Poisson batches, per-example clipping, CSPRNG noise) for ``--epochs`` epochs, the noise
calibrated by the ledger's RDP accountant to ``--epsilon`` over all of them, and prints JSON:
the accuracy on the first ``--test-items`` test singles every 3 epochs and after the last.
No federation: a site's noise is not averaged with other sites' here, so the figures sit
below the default run's; compare variants with each other, side by side.

    python -m fedmm.simulations.benchmarks.site_dp_levers --set model-text-layers=0
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from fedmm.client.privacy_ledger import calibrate_noise_multiplier
from fedmm.client.training import DPSGDSettings, TrainingRecipe, train_locally
from fedmm.common.data.benchmark import benchmark_test_set, benchmark_train_records
from fedmm.common.federation_config import FederationConfig
from fedmm.common.model import CrossAttentionMatcher
from fedmm.common.tokenizer import HashingTokenizer
from fedmm.common.train_request import model_config_of
from fedmm.server.evaluation import evaluate
from fedmm.simulations.cli import BENCHMARK_MODEL


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=5130)
    parser.add_argument("--epochs", type=int, default=14)
    parser.add_argument("--epsilon", type=float, default=3.0)
    parser.add_argument("--test-items", type=int, default=2000)
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="run config keys over the benchmark's model (batch-size, learning-rate, ...)",
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    overrides = dict(pair.split("=", 1) for pair in args.set)
    config = FederationConfig.from_run_config({**BENCHMARK_MODEL, **overrides})
    data = benchmark_train_records().subset(torch.arange(args.records).numpy())
    test = benchmark_test_set(num_scenes=10).first_singles(args.test_items)
    model = CrossAttentionMatcher(model_config_of(config))
    tokenizer = HashingTokenizer(
        num_buckets=model.config.vocab_buckets, max_len=model.config.max_len
    )
    rate = config.batch_size / args.records
    sigma = calibrate_noise_multiplier(
        epsilon=args.epsilon,
        delta=config.delta,
        sample_rate=rate,
        steps=args.epochs * round(1 / rate),
    )
    dp = DPSGDSettings(sigma, config.max_grad_norm)
    history: list[tuple[float, float, int]] = []
    curve = []
    started = time.monotonic()
    for epoch in range(1, args.epochs + 1):
        recipe = TrainingRecipe.from_settings(config, seed=epoch)
        history = train_locally(
            model, data, recipe=recipe, dp=dp, accountant_history=history, tokenizer=tokenizer
        ).accountant_history
        if epoch % 3 == 0 or epoch == args.epochs:
            accuracy = evaluate(model, test, tokenizer).to_dict()["accuracy"]
            curve.append([epoch, round(accuracy, 4)])
    print(
        json.dumps(
            {
                "set": overrides,
                "records": args.records,
                "epsilon": args.epsilon,
                "noise_multiplier": round(sigma, 4),
                "accuracy_by_epoch": curve,
                "seconds": round(time.monotonic() - started, 1),
            }
        )
    )


if __name__ == "__main__":
    main()
