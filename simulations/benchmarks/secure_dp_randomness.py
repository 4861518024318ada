"""The cost of drawing DP-SGD's noise and Poisson batches from a CSPRNG, per round.

Side by side in one process, in alternating repetitions, on the default run's site (6,000
benchmark records, batch 256: q = 1/24, 24 steps a round, the default model):

- ``torch_rng``: the previous path, Opacus 1.6's ``PrivacyEngine.make_private`` (its
  ``DPDataLoader`` samples with torch's generator, its ``DPOptimizer`` draws
  ``torch.normal``);
- ``csprng``: ``client.training.train_locally`` as sites run it now (Poisson membership from
  AES-CTR uniforms, Box-Muller noise from the same keystream, ``client.secure_dp_sgd``).

Also the two random parts alone, per round: noise for every trainable parameter at each
step, and one membership draw per record at each step. Prints JSON (best of the repeats).
Usage:
    python -m fedmm.simulations.benchmarks.secure_dp_randomness [--records 6000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import math
import time
import warnings

import numpy as np
import torch
from torch.utils.data import DataLoader

from fedmm.client.training import (
    DPSGDSettings,
    MatchingDataset,
    TrainingRecipe,
    make_optimizer,
    sample_rate,
    steps_per_epoch,
    train_locally,
)
from fedmm.common.data.benchmark import benchmark_train_records
from fedmm.common.loss import matching_loss
from fedmm.common.model import CrossAttentionMatcher
from fedmm.common.model_config import ModelConfig
from fedmm.common.secure_random import bernoulli_indices, fresh_random_bytes, standard_normals
from fedmm.common.tokenizer import HashingTokenizer


def _torch_rng_round(data, recipe: TrainingRecipe, config: ModelConfig) -> float:
    """One round through Opacus' own data loader and optimizer (torch's generator)."""
    from opacus import PrivacyEngine

    model = CrossAttentionMatcher(config)
    started = time.perf_counter()  # from the same point as train_locally: data set included
    dataset = MatchingDataset(
        data, tokenizer=HashingTokenizer(), num_distractors=recipe.num_distractors, seed=0
    )
    loader = DataLoader(dataset, batch_size=recipe.batch_size, shuffle=True)
    engine = PrivacyEngine(accountant="rdp")
    private_model, optimizer, private_loader = engine.make_private(
        module=model,
        optimizer=make_optimizer(model, recipe),
        data_loader=loader,
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        poisson_sampling=True,
        grad_sample_mode="hooks",
    )
    private_model.train()
    for images, tokens in private_loader:
        optimizer.zero_grad(set_to_none=True)
        losses = matching_loss(private_model(images, tokens))
        (losses.sum() if len(images) == 0 else losses.mean()).backward()
        optimizer.step()
    elapsed = time.perf_counter() - started
    private_model._close()
    return elapsed


def _csprng_round(data, recipe: TrainingRecipe, config: ModelConfig) -> float:
    model = CrossAttentionMatcher(config)
    dp = DPSGDSettings(noise_multiplier=1.0, max_grad_norm=1.0, record_count=len(data))
    started = time.perf_counter()
    train_locally(model, data, recipe=recipe, dp=dp, accountant_history=[])
    return time.perf_counter() - started


def _randomness_alone(
    *, records: int, batch_size: int, dimension: int
) -> dict[str, dict[str, float]]:
    """Seconds per round for the noise and the membership draws alone."""
    steps = steps_per_epoch(records, batch_size)
    rate = sample_rate(records, batch_size)
    stream = fresh_random_bytes()
    generator = torch.Generator()
    out: dict[str, dict[str, float]] = {"noise": {}, "sampling": {}}
    started = time.perf_counter()
    for _ in range(steps):
        torch.normal(0.0, 1.0, (dimension,), generator=generator)
    out["noise"]["torch_rng_s"] = time.perf_counter() - started
    started = time.perf_counter()
    for _ in range(steps):
        torch.from_numpy(standard_normals(dimension, stream)).to(torch.float32)
    out["noise"]["csprng_s"] = time.perf_counter() - started
    started = time.perf_counter()
    for _ in range(steps):
        torch.nonzero(torch.rand(records, generator=generator) < rate)
    out["sampling"]["torch_rng_s"] = time.perf_counter() - started
    started = time.perf_counter()
    for _ in range(steps):
        bernoulli_indices(records, rate, stream)
    out["sampling"]["csprng_s"] = time.perf_counter() - started
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--records", type=int, default=6000)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")  # Opacus: secure RNG off; full backward hooks
    torch.set_num_threads(args.threads)
    config = ModelConfig()
    data = benchmark_train_records().subset(np.arange(args.records))
    recipe = TrainingRecipe(batch_size=args.batch_size, learning_rate=4.0, num_distractors=4)
    dimension = sum(p.numel() for p in CrossAttentionMatcher(config).parameters())
    old, new = [], []
    for _ in range(args.repeats):
        old.append(_torch_rng_round(data, recipe, config))
        new.append(_csprng_round(data, recipe, config))
    alone = [
        _randomness_alone(records=args.records, batch_size=args.batch_size, dimension=dimension)
        for _ in range(args.repeats)
    ]
    parts = {
        part: {key: round(min(a[part][key] for a in alone), 4) for key in alone[0][part]}
        for part in alone[0]
    }
    print(
        json.dumps(
            {
                "records": args.records,
                "batch_size": args.batch_size,
                "steps_per_round": steps_per_epoch(args.records, args.batch_size),
                "trainable_parameters": dimension,
                "torch_threads": args.threads,
                "round_s": {
                    "torch_rng": round(min(old), 3),
                    "csprng": round(min(new), 3),
                    "ratio": round(min(new) / min(old), 3),
                },
                "randomness_alone_per_round_s": parts,
                "repeats": args.repeats,
                "per_step_noise_ms_csprng": round(
                    1000 * parts["noise"]["csprng_s"] / math.ceil(args.records / args.batch_size),
                    3,
                ),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
