"""Centralised DP-SGD on the pooled benchmark data: the reference beside federated runs.

Same model, loss, optimiser and DP-SGD as a site uses (``client.training.train_locally``),
but one party holding all training records; ``learning-rate-schedule`` runs over epochs as
it runs over rounds in a federation. Prints one JSON line per epoch and a final
JSON summary.

``--public-records P`` declares P training records, drawn at random, public: the model
trains on them first without noise (``--public-epochs`` epochs of Adam at 3e-3 in batches of
64, the non-private recipe), then with DP-SGD on the other records only, so the accounted
epsilon covers those. A lever of the DP literature (public pretraining); the public records
have no protection. Usage:
    python -m fedmm.simulations.centralised_reference --epochs 6 --epsilon 3 \
        --set model-width=32 --set learning-rate=4
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import replace

import numpy as np
import torch

from fedmm.client.privacy_ledger import calibrate_noise_multiplier, epsilon_of
from fedmm.client.training import (
    DPSGDSettings,
    TrainingRecipe,
    sample_rate,
    steps_per_epoch,
    train_locally,
)
from fedmm.common.data.benchmark import benchmark_test_set, benchmark_train_records
from fedmm.common.federation_config import FederationConfig
from fedmm.common.model import CrossAttentionMatcher
from fedmm.common.tokenizer import HashingTokenizer
from fedmm.common.train_request import model_config_of
from fedmm.server.evaluation import evaluate


def public_split(count: int, public: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Row indices of ``public`` records drawn at random from ``count``, and of the others
    (each sorted): the declared-public records and the private ones, disjoint."""
    if not 0 <= public < count:
        raise SystemExit(f"--public-records must be in [0, {count}): the training records")
    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed)).numpy()
    return np.sort(order[:public]), np.sort(order[public:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--epsilon", type=float, default=3.0)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--public-records", type=int, default=0)
    parser.add_argument("--public-epochs", type=int, default=5)
    args = parser.parse_args()
    overrides = dict(pair.split("=", 1) for pair in args.set)
    config = FederationConfig.from_run_config({**overrides, "epsilon": args.epsilon})
    config = replace(config, num_server_rounds=args.epochs)  # an epoch plays a round's part
    torch.set_num_threads(args.threads)
    torch.manual_seed(config.seed)
    data = benchmark_train_records(config.data_dir or None)
    test = benchmark_test_set(config.data_dir or None, num_scenes=config.eval_scenes)
    model = CrossAttentionMatcher(model_config_of(config))
    tokenizer = HashingTokenizer(
        num_buckets=model.config.vocab_buckets, max_len=model.config.max_len
    )
    if args.public_records:
        public_rows, private_rows = public_split(len(data), args.public_records, config.seed)
        public, data = data.subset(public_rows), data.subset(private_rows)
        public_recipe = TrainingRecipe(
            local_epochs=args.public_epochs,
            batch_size=64,
            learning_rate=3e-3,
            optimizer="adam",
            num_distractors=config.num_distractors,
            seed=config.seed,
        )
        train_locally(
            model, public, recipe=public_recipe, dp=None, accountant_history=[], tokenizer=tokenizer
        )
        row = {"public_records": len(public), **evaluate(model, test, tokenizer).to_dict()}
        print(json.dumps({"epoch": 0, **row}), flush=True)
    rate = sample_rate(len(data), config.batch_size)
    sigma = calibrate_noise_multiplier(
        epsilon=config.epsilon,
        delta=config.delta,
        sample_rate=rate,
        steps=args.epochs * steps_per_epoch(len(data), config.batch_size),
    )
    dp = DPSGDSettings(sigma, config.max_grad_norm) if math.isfinite(config.epsilon) else None
    history: list[tuple[float, float, int]] = []
    started = time.monotonic()
    for epoch in range(1, args.epochs + 1):
        learning_rate = config.learning_rate_in_round(epoch)
        recipe = TrainingRecipe.from_settings(
            replace(config, local_epochs=1, learning_rate=learning_rate), seed=config.seed + epoch
        )
        result = train_locally(
            model, data, recipe=recipe, dp=dp, accountant_history=history, tokenizer=tokenizer
        )
        history = result.accountant_history
        row = {
            "epoch": epoch,
            "learning_rate": round(learning_rate, 6),
            "noise_multiplier": round(sigma, 4),
            "epsilon": epsilon_of(history, config.delta) if dp else math.inf,
            "delta": config.delta,
            "train_loss": round(result.mean_loss, 4),
            **evaluate(model, test, tokenizer).to_dict(),
            "wall_s": round(time.monotonic() - started, 1),
        }
        print(json.dumps({k: str(v) if v == math.inf else v for k, v in row.items()}), flush=True)


if __name__ == "__main__":
    main()
