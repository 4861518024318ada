"""DP-SGD training throughput against non-private training on the same model and data.

Prints JSON: samples/s for each, their ratio (measured side by side in one process, in
alternating repetitions), and the process's peak RSS. Usage:
    python -m fedmm.simulations.benchmarks.dp_throughput [--records 2048] [--repeats 3] \
        [--image-encoder patches|conv|scatter]
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import torch

from fedmm.client.training import DPSGDSettings, TrainingRecipe, train_locally
from fedmm.common.data.benchmark import benchmark_train_records
from fedmm.common.model import CrossAttentionMatcher
from fedmm.common.model_config import IMAGE_ENCODERS, ModelConfig


def _samples_per_second(
    data, *, dp: DPSGDSettings | None, batch_size: int, seed: int, config: ModelConfig
) -> float:
    model = CrossAttentionMatcher(config)
    recipe = TrainingRecipe(batch_size=batch_size, learning_rate=1e-3, optimizer="adam", seed=seed)
    started = time.perf_counter()
    result = train_locally(model, data, recipe=recipe, dp=dp, accountant_history=[])
    elapsed = time.perf_counter() - started
    return result.num_examples / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--records", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--image-encoder", choices=IMAGE_ENCODERS, default="patches")
    args = parser.parse_args()
    config = ModelConfig(image_encoder=args.image_encoder)
    torch.set_num_threads(args.threads)
    data = benchmark_train_records().subset(torch.arange(args.records).numpy())
    dp = DPSGDSettings(noise_multiplier=1.0, max_grad_norm=1.0)
    plain, private = [], []
    for repeat in range(args.repeats):
        for dp_settings, samples in ((None, plain), (dp, private)):
            samples.append(
                _samples_per_second(
                    data, dp=dp_settings, batch_size=args.batch_size, seed=repeat, config=config
                )
            )
    best_plain, best_private = max(plain), max(private)
    print(
        json.dumps(
            {
                "records": args.records,
                "batch_size": args.batch_size,
                "image_encoder": args.image_encoder,
                "torch_threads": args.threads,
                "non_private_samples_per_s": round(best_plain, 1),
                "dp_sgd_samples_per_s": round(best_private, 1),
                "dp_slowdown": round(best_plain / best_private, 2),
                "target_dp_slowdown_at_most": 2.5,
                "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
