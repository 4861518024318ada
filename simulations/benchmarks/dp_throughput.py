"""DP-SGD training throughput against non-private training on the same model and data.

Prints JSON: for each model width, samples/s of ``client.training.train_locally`` without DP
and with DP-SGD (per-example clipping from ``client.per_example_gradients``, CSPRNG noise and
Poisson batches), measured side by side in one process in alternating repetitions (best of
the repetitions), their ratio, the load average before and after, and the peak RSS. Usage:
    python -m fedmm.simulations.benchmarks.dp_throughput [--records 2048] [--repeats 3] \
        [--widths 32 64] [--image-encoder patches|conv|scatter|scatter-linear] \
        [--image-layers 1] [--text-layers 1]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time

import torch

from fedmm.client.training import DPSGDSettings, TrainingRecipe, train_locally
from fedmm.common.data.benchmark import benchmark_train_records
from fedmm.common.model import CrossAttentionMatcher
from fedmm.common.model_config import ACTIVATIONS, IMAGE_ENCODERS, ModelConfig

TARGET_DP_OVER_NON_PRIVATE = 0.8


def _samples_per_second(
    data, *, dp: DPSGDSettings | None, batch_size: int, seed: int, config: ModelConfig
) -> float:
    model = CrossAttentionMatcher(config)
    recipe = TrainingRecipe(batch_size=batch_size, learning_rate=1e-3, optimizer="adam", seed=seed)
    started = time.perf_counter()
    result = train_locally(model, data, recipe=recipe, dp=dp, accountant_history=[])
    elapsed = time.perf_counter() - started
    return result.num_examples / elapsed


def _load() -> float:
    return round(os.getloadavg()[0], 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--records", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--widths", type=int, nargs="+", default=[32, 64])
    parser.add_argument("--image-encoder", choices=IMAGE_ENCODERS, default="patches")
    parser.add_argument("--activation", choices=ACTIVATIONS, default="gelu")
    parser.add_argument(
        "--image-layers", type=int, default=1, help="0 with --image-encoder scatter-linear"
    )
    parser.add_argument("--text-layers", type=int, default=1, help="0: no caption block")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    data = benchmark_train_records().subset(torch.arange(args.records).numpy())
    dp = DPSGDSettings(noise_multiplier=1.0, max_grad_norm=1.0)
    load_before = _load()
    samples: dict[int, dict[str, list[float]]] = {
        width: {"plain": [], "dp": []} for width in args.widths
    }
    for repeat in range(args.repeats):
        for width in args.widths:
            config = ModelConfig(
                width=width,
                image_encoder=args.image_encoder,
                activation=args.activation,
                image_layers=args.image_layers,
                text_layers=args.text_layers,
            )
            for kind, dp_settings in (("plain", None), ("dp", dp)):
                samples[width][kind].append(
                    _samples_per_second(
                        data,
                        dp=dp_settings,
                        batch_size=args.batch_size,
                        seed=repeat,
                        config=config,
                    )
                )
    widths = {}
    for width, measured in samples.items():
        plain, private = max(measured["plain"]), max(measured["dp"])
        widths[str(width)] = {
            "non_private_samples_per_s": round(plain, 1),
            "dp_sgd_samples_per_s": round(private, 1),
            "dp_over_non_private": round(private / plain, 3),
            "dp_slowdown": round(plain / private, 2),
        }
    print(
        json.dumps(
            {
                "records": args.records,
                "batch_size": args.batch_size,
                "image_encoder": args.image_encoder,
                "activation": args.activation,
                "image_layers": args.image_layers,
                "text_layers": args.text_layers,
                "torch_threads": args.threads,
                "repeats": args.repeats,
                "widths": widths,
                "target_dp_over_non_private_at_least": TARGET_DP_OVER_NON_PRIVATE,
                "load_average_1min_before_after": [load_before, _load()],
                "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
