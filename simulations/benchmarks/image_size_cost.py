"""What an image costs the model at each size: forward+backward and DP-SGD per example.

For each image encoder (``patches`` with 8x8 patches, ``conv``, ``scatter``) and square
image size (32, 64, 128 by default), on random RGB images (or grayscale with
``--channels 1``) and random captions (1 + 4 candidates of 12 tokens), in batches of
``--batch``, one torch thread:

- ``forward_backward_ms``: non-private training step (loss, backward) per image;
- ``dp_sgd_ms``: one Opacus DP-SGD step (per-example gradients with the "hooks" sampler,
  per-example clipping, Gaussian noise, SGD update) per image, scattering features already
  memoised (as at a simulated site after its first epoch);
- ``scatter_transform_ms``: the fixed scattering transform per image, paid once per record
  and process (every round at a deployed site).

Prints JSON, one object per (encoder, size), with the best of ``--repeats`` timings, model
parameters, image tokens and the process's peak RSS. Usage::

    python -m fedmm.simulations.benchmarks.image_size_cost [--sizes 32 64 128] [--channels 3]
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from dataclasses import replace

import torch

from fedmm.common import scattering
from fedmm.common.loss import matching_loss
from fedmm.common.model import CrossAttentionMatcher
from fedmm.common.model_config import IMAGE_ENCODERS, ModelConfig

CANDIDATES, WORDS = 5, 12


def _inputs(config: ModelConfig, batch: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (batch, *config.record_image_shape), generator=generator)
    tokens = torch.randint(1, config.vocab_buckets, (batch, CANDIDATES, WORDS), generator=generator)
    return images.to(torch.uint8), tokens


def _best_ms_per_image(step, batch: int, repeats: int) -> float:
    step()  # warm-up: allocations, memoised scattering features
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        step()
        best = min(best, time.perf_counter() - started)
    return 1000 * best / batch


def _non_private_step(config: ModelConfig, batch: int):
    model = CrossAttentionMatcher(config)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    images, tokens = _inputs(config, batch, seed=0)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        matching_loss(model(images, tokens)).mean().backward()
        optimizer.step()

    return step


def _dp_sgd_step(config: ModelConfig, batch: int):
    from opacus import PrivacyEngine
    from torch.utils.data import DataLoader, TensorDataset

    model = CrossAttentionMatcher(config)
    images, tokens = _inputs(config, batch, seed=1)
    loader = DataLoader(TensorDataset(images, tokens), batch_size=batch)
    engine = PrivacyEngine(accountant="rdp")
    private, optimizer, private_loader = engine.make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.01),
        data_loader=loader,
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        poisson_sampling=False,  # a full batch every step: the cost of one example is clear
        grad_sample_mode="hooks",
    )

    def step() -> None:
        for batch_images, batch_tokens in private_loader:
            optimizer.zero_grad(set_to_none=True)
            matching_loss(private(batch_images, batch_tokens)).mean().backward()
            optimizer.step()

    return step


def _scatter_transform_ms(config: ModelConfig, batch: int, repeats: int) -> float:
    best = float("inf")
    for seed in range(repeats + 1):
        images, _ = _inputs(config, batch, seed=100 + seed)
        x = images.float() / 255.0
        x = x[:, None] if config.image_channels == 1 else x.permute(0, 3, 1, 2).contiguous()
        scattering._memo.clear()
        started = time.perf_counter()
        scattering.scattering_features(x)
        if seed:  # the first builds the filter bank
            best = min(best, time.perf_counter() - started)
    return 1000 * best / batch


def measure(
    encoder: str, size: int, *, channels: int, batch: int, repeats: int, width: int
) -> dict[str, object]:
    config = replace(
        ModelConfig(width=width),
        image_encoder=encoder,
        image_height=size,
        image_width=size,
        image_channels=channels,
        patch_size=8,
    )
    row: dict[str, object] = {
        "encoder": encoder,
        "image_size": f"{size}x{size}",
        "channels": channels,
        "image_tokens": config.num_image_tokens,
        "parameters": sum(p.numel() for p in CrossAttentionMatcher(config).parameters()),
        "batch": batch,
        "forward_backward_ms": round(
            _best_ms_per_image(_non_private_step(config, batch), batch, repeats), 3
        ),
        "dp_sgd_ms": round(_best_ms_per_image(_dp_sgd_step(config, batch), batch, repeats), 3),
    }
    if encoder == "scatter":
        row["scatter_transform_ms"] = round(_scatter_transform_ms(config, batch, repeats), 3)
    scattering._memo.clear()
    row["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 64, 128])
    parser.add_argument("--encoders", nargs="+", choices=IMAGE_ENCODERS, default=IMAGE_ENCODERS)
    parser.add_argument("--channels", type=int, choices=(1, 3), default=3)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows = [
        measure(
            encoder,
            size,
            channels=args.channels,
            batch=args.batch,
            repeats=args.repeats,
            width=args.width,
        )
        for encoder in args.encoders
        for size in args.sizes
    ]
    print(json.dumps({"torch_threads": args.threads, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
