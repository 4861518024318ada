"""Does the loss learn on real data? Centralised training on OpenClipart, image->text recall.

Trains the model with the site's own training code (``client.training.train_locally``: the
matching loss with caption-bank and word-swap distractors, Opacus DP-SGD when
``--epsilon`` is finite) on the ``train`` imagefolder of an OpenClipart benchmark folder
(``simulations.benchmarks.openclipart_imagefolder``), one party holding all records, and
measures image->text retrieval on its ``test`` records: one record per distinct test caption
(the first in file order), and every such image ranks all D captions; a hit at k is its own
caption among the first k. Any ranking that ignores the image (a prior over captions, say)
puts each caption at one rank for all images, and as each caption belongs to one image it
hits exactly k / D: the chance level. The control ``--condition shuffled`` trains on the same
images and captions with the images shuffled among the training records (a fixed
permutation): nothing links an image to its caption any more, so its recall must fall to
chance, showing that recall above chance comes from the images.

Prints one JSON line per epoch and a final JSON summary. Usage::

    python -m fedmm.simulations.benchmarks.openclipart_retrieval DATA \\
        --condition plain|dp|shuffled \\
        [--epochs 10] [--epsilon 8] [--set KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import replace
from pathlib import Path

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
from fedmm.common.cli_arguments import key_value_pairs
from fedmm.common.data.dataset import ImageTextDataset
from fedmm.common.data.imagefolder import load_imagefolder
from fedmm.common.federation_config import FederationConfig
from fedmm.common.model import CrossAttentionMatcher
from fedmm.common.model_config import ModelConfig
from fedmm.common.tokenizer import HashingTokenizer
from fedmm.common.train_request import model_config_of
from fedmm.simulations.benchmarks.openclipart_imagefolder import BANK_FILE

#: The recipe of the measurement in docs/real-data.md; ``--set`` overrides any key.
DEFAULTS = {
    "image-size": "64x64",
    "image-channels": 3,
    "model-patch-size": 8,
    "model-caption-words": 24,
    "model-vocab-buckets": 4096,
    "model-image-encoder": "patches",
    "distractor-word-lists": "colours,positions,counts,sizes",
    "num-distractors": 8,
    "batch-size": 256,
    "optimizer": "adam",
    "learning-rate": 0.002,
}
RECALL_AT = (1, 5, 10)


def one_record_per_caption(data: ImageTextDataset) -> ImageTextDataset:
    """The first record of each distinct caption, in order."""
    first: dict[str, int] = {}
    for i, caption in enumerate(data.captions):
        first.setdefault(caption, i)
    return data.subset(np.array(sorted(first.values())))


def retrieval_recall(
    model: CrossAttentionMatcher, test: ImageTextDataset, tokenizer: HashingTokenizer
) -> dict[str, float]:
    """Image->text recall@k of records with distinct captions (``test`` must have them),
    and chance (k / D)."""
    distinct = list(test.captions)
    if len(set(distinct)) != len(distinct):
        raise ValueError("retrieval needs one record per caption: use one_record_per_caption")
    own = np.arange(len(distinct))
    model.eval()
    with torch.no_grad():
        texts = model.encode_texts(torch.from_numpy(tokenizer.encode_batch(distinct)))
        parts = [
            model.encode_images(torch.from_numpy(test.images[i : i + 256]))
            for i in range(0, len(test), 256)
        ]
        images = type(parts[0])(
            torch.cat([p.keys for p in parts]), torch.cat([p.values for p in parts])
        )
        scores = model.score_all_pairs(images, texts).numpy()
    model.train()
    rank = (scores > scores[np.arange(len(own)), own][:, None]).sum(1)  # ties count for it
    out: dict[str, float] = {"captions": len(distinct)}
    for k in RECALL_AT:
        out[f"r_at_{k}"] = round(float((rank < k).mean()), 4)
        out[f"chance_r_at_{k}"] = round(k / len(distinct), 4)
    return out


def _shuffled_images(data: ImageTextDataset, seed: int) -> ImageTextDataset:
    order = np.random.default_rng(seed).permutation(len(data))
    return ImageTextDataset(images=data.images[order], captions=data.captions, labels=data.labels)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("data", type=Path, help="folder from openclipart_imagefolder")
    parser.add_argument("--condition", choices=("plain", "dp", "shuffled"), default="plain")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--epsilon", type=float, default=8.0, help="for --condition dp")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    overrides = {**DEFAULTS, **key_value_pairs(args.set, option="--set")}
    overrides["caption-bank"] = str(args.data / BANK_FILE)
    overrides["epsilon"] = args.epsilon if args.condition == "dp" else math.inf
    config = FederationConfig.from_run_config(overrides)
    config = replace(config, num_server_rounds=args.epochs)  # an epoch plays a round's part
    torch.set_num_threads(args.threads)
    torch.manual_seed(config.seed)
    model_config: ModelConfig = model_config_of(config)
    loading = {
        "image_size": model_config.image_size,
        "channels": model_config.image_channels,
        "caption_words": model_config.max_len,
    }
    started = time.monotonic()
    train, train_report = load_imagefolder(args.data / "train", **loading)
    test, _ = load_imagefolder(args.data / "test", **loading)
    test = one_record_per_caption(test)
    if args.condition == "shuffled":
        train = _shuffled_images(train, seed=config.seed)
    load_s = round(time.monotonic() - started, 1)
    model = CrossAttentionMatcher(model_config)
    tokenizer = HashingTokenizer.for_model(model_config)
    dp = None
    if math.isfinite(config.epsilon):
        sigma = calibrate_noise_multiplier(
            epsilon=config.epsilon,
            delta=config.delta,
            sample_rate=sample_rate(len(train), config.batch_size),
            steps=args.epochs * steps_per_epoch(len(train), config.batch_size),
        )
        dp = DPSGDSettings(sigma, config.max_grad_norm)
    history: list[tuple[float, float, int]] = []
    summary: dict[str, object] = {
        "condition": args.condition,
        "records": {"train": len(train), "test": len(test)},
        "load": {"seconds": load_s, "train_report": train_report.to_dict()},
        "run_config": {k: str(v) for k, v in sorted(overrides.items())},
        "noise_multiplier": None if dp is None else round(dp.noise_multiplier, 4),
        "delta": config.delta,
        "before_training": retrieval_recall(model, test, tokenizer),
    }
    started = time.monotonic()
    for epoch in range(1, args.epochs + 1):
        recipe = TrainingRecipe.from_settings(
            replace(config, local_epochs=1, learning_rate=config.learning_rate_in_round(epoch)),
            seed=config.seed + epoch,
        )
        result = train_locally(
            model, train, recipe=recipe, dp=dp, accountant_history=history, tokenizer=tokenizer
        )
        history = result.accountant_history
        row = {
            "epoch": epoch,
            "train_loss": round(result.mean_loss, 4),
            "epsilon": round(epsilon_of(history, config.delta), 3) if dp else "inf",
            **retrieval_recall(model, test, tokenizer),
            "wall_s": round(time.monotonic() - started, 1),
        }
        print(json.dumps(row), flush=True)
        summary["final"] = row
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
