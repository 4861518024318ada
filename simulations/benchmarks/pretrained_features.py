"""The cost of frozen pretrained encoders at a site: DP-SGD on cached features against the
same DP-SGD with the frozen encoders in the loop, and feature extraction's time and memory.

Prints JSON with two parts (random weights: the cost is what is measured, not accuracy):

- ``dp_round``: one site's DP-SGD round (``client.secure_dp_sgd.train_dp_sgd``: Poisson
  batches, per-example clipping, CSPRNG noise, the same sampling rate and steps) of the
  fusion head, once on cached features (``client.feature_training``) and once with the
  frozen encoders computing every sampled record's image tokens and its candidates' token
  states in every step; seconds per step, and the speed-up (target: at least 10x).
- ``extraction``: per backbone (a timm ViT at 224x224, random weights), seconds per image
  and the peak resident memory of a process that loads it and extracts features of
  ``--images`` images in batches of ``--batch``, each measured in a fresh process.

Usage (2 torch threads: the site's 2 cores):
    python -m fedmm.simulations.benchmarks.pretrained_features [--threads 2] \
        [--backbones vit_small_patch16_224 vit_base_patch16_224 vit_large_patch16_224]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fedmm.common.pretrained.torchvision_shim import import_torchvision

DP_ROUND_TARGET_SPEEDUP = 10.0


class EncodersInTheLoop(nn.Module):
    """The fusion head with the frozen encoders run on each batch: images ``uint8`` and
    candidate captions as rows of a caption table, encoded in every forward pass."""

    def __init__(self, head: nn.Module, encoders, captions: list[str], max_tokens: int) -> None:
        super().__init__()
        self.head = head
        self.encoders = encoders
        self.captions = captions
        self.max_tokens = max_tokens

    def forward(self, images: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            image = self.encoders.image.features(images)
            texts = [self.captions[int(r)] for r in rows.flatten()]
            states, valid = self.encoders.text.features(texts, self.max_tokens)
        shape = (*rows.shape, self.max_tokens)
        return self.head(image, states.view(*shape, -1), valid.view(shape))


class RowsDataset(torch.utils.data.Dataset):
    """Items ``(image uint8, candidate caption rows)`` with the same draws as the cached
    features' dataset."""

    def __init__(self, images: np.ndarray, features_dataset) -> None:
        self.images = images
        self.features_dataset = features_dataset

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        rows = self.features_dataset.candidate_rows(index)
        return torch.from_numpy(self.images[index]), torch.from_numpy(rows)


#: The synthetic site's caption words (its captions, caption bank and random BERT's vocabulary).
COLOURS = ("red", "blue", "green", "yellow", "black", "white")
BERT_WORDS = [*COLOURS, "drawing", "house"]


def synthetic_site(count: int) -> tuple[Any, Any, np.random.Generator]:
    """``count`` random 224x224 RGB records with colour captions, distractor settings
    (colour word swaps and a public caption bank), and the generator that drew the images
    (later draws continue its stream): a site's data for timing rounds."""
    from fedmm.common.data.caption_bank import CaptionBank
    from fedmm.common.data.dataset import NO_LABEL, ImageTextDataset
    from fedmm.common.distractors import DistractorSettings

    bank = CaptionBank.from_bytes(
        "".join(f"a public {c} drawing number {i}\n" for c in COLOURS for i in range(20)).encode(),
        source="benchmark",
    )
    distractors = DistractorSettings(word_lists=("colours",), bank=bank)
    captions = [f"a {COLOURS[i % 6]} drawing of a house {i}" for i in range(count)]
    rng = np.random.default_rng(0)
    records = ImageTextDataset(
        images=rng.integers(0, 256, (count, 224, 224, 3), dtype=np.uint8),
        captions=captions,
        labels=np.full(count, NO_LABEL, dtype=np.int64),
    )
    return records, distractors, rng


def _dp_round(args: argparse.Namespace) -> dict:
    import_torchvision()
    from fedmm.client.caption_length_batches import whole_batch
    from fedmm.client.feature_cache import (
        SiteFeatures,
        caption_table,
        compute_site_features,
        distractor_pools,
    )
    from fedmm.client.feature_training import FeatureMatchingDataset
    from fedmm.client.secure_dp_sgd import train_dp_sgd
    from fedmm.common.model_config import ModelConfig
    from fedmm.common.pretrained.encoder_spec import EncoderSpec, weights_digest
    from fedmm.common.pretrained.frozen_encoders import load_frozen_encoders, resolve_model_config
    from fedmm.common.pretrained.fusion_model import FeatureFusionMatcher
    from fedmm.common.secure_random import fresh_random_bytes
    from fedmm.common.tokenizer import HashingTokenizer
    from fedmm.simulations.random_encoders import write_random_bert, write_random_timm

    records, distractors, rng = synthetic_site(args.records)
    captions = records.captions
    with tempfile.TemporaryDirectory() as tmp:
        vit = write_random_timm(Path(tmp) / "vit", args.dp_backbone)
        bert = write_random_bert(Path(tmp) / "bert", words=BERT_WORDS)
        encoders = load_frozen_encoders(
            EncoderSpec("timm", args.dp_backbone, str(vit), weights_digest(vit)),
            EncoderSpec("hf", "bert-tiny", str(bert), weights_digest(bert)),
        )
        config = resolve_model_config(
            ModelConfig(
                image_height=224,
                image_width=224,
                image_channels=3,
                max_len=16,
                image_encoder=f"timm:{args.dp_backbone}",
                text_encoder="hf:bert-tiny",
            ),
            encoders,
        )
        started = time.perf_counter()
        features = compute_site_features(
            records,
            encoders,
            config=config,
            settings=distractors,
            num_distractors=args.distractors,
            rng=rng,
        )
        extraction_s = time.perf_counter() - started
        # in the loop: the same kind of candidates, kept as text for the encoders
        pools = distractor_pools(
            captions,
            settings=distractors,
            tokenizer=HashingTokenizer.for_model(config),
            num_distractors=args.distractors,
            rng=rng,
        )
        table, caption_row, distractor_rows = caption_table(captions, pools)
        loop_rows = SiteFeatures(
            image=features.image[:, :1],
            text=features.text[:1],
            text_valid=features.text_valid[:1],
            caption_row=caption_row,
            distractor_rows=distractor_rows,
        )
        timings = {}
        rate = args.batch / args.records
        for name in ("cached", "in_the_loop"):
            torch.manual_seed(0)
            head = FeatureFusionMatcher(config)
            if name == "cached":
                model: nn.Module = head
                dataset = FeatureMatchingDataset(features, num_distractors=args.distractors, seed=0)
            else:
                model = EncodersInTheLoop(head, encoders, table, config.max_len)
                dataset = RowsDataset(
                    records.images,
                    FeatureMatchingDataset(loop_rows, num_distractors=args.distractors, seed=0),
                )
            optimizer = torch.optim.SGD(head.parameters(), lr=0.1)
            started = time.perf_counter()
            train_dp_sgd(
                model,
                dataset,
                optimizer=optimizer,
                noise_multiplier=1.0,
                max_grad_norm=1.0,
                sample_rate=rate,
                steps=args.steps,
                expected_batch_size=args.batch,
                accountant_history=[],
                random_bytes=fresh_random_bytes(),
                batch_parts=whole_batch,
            )
            timings[name] = (time.perf_counter() - started) / args.steps
    return {
        "backbone": args.dp_backbone,
        "text_encoder": "BERT, 2 layers of width 32 (random)",
        "records": args.records,
        "expected_batch": args.batch,
        "steps": args.steps,
        "num_distractors": args.distractors,
        "feature_extraction_s": round(extraction_s, 2),
        "cached_s_per_step": round(timings["cached"], 4),
        "in_the_loop_s_per_step": round(timings["in_the_loop"], 3),
        "speedup": round(timings["in_the_loop"] / timings["cached"], 1),
        "target_speedup": DP_ROUND_TARGET_SPEEDUP,
    }


def _extract(backbone: str, images: int, batch: int, threads: int) -> dict:
    """In this process: build ``backbone`` (random), extract features of ``images`` images."""
    torch.set_num_threads(threads)
    import_torchvision()
    import timm

    model = timm.create_model(backbone, pretrained=False, num_classes=0).eval()
    parameters = sum(p.numel() for p in model.parameters())
    x = torch.randn(batch, 3, 224, 224)
    with torch.no_grad():
        model.forward_features(x[:1])  # warm-up
        started = time.perf_counter()
        done, tokens = 0, None
        while done < images:
            tokens = model.forward_features(x)
            done += batch
        elapsed = time.perf_counter() - started
    assert tokens is not None
    return {
        "backbone": backbone,
        "parameters_millions": round(parameters / 1e6, 1),
        "tokens_per_image": int(tokens.shape[1]),
        "feature_dim": int(tokens.shape[2]),
        "batch": batch,
        "images": done,
        "s_per_image": round(elapsed / done, 4),
        "images_per_s": round(done / elapsed, 2),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "cached_fp16_kb_per_image": round(tokens.shape[1] * tokens.shape[2] * 2 / 1024, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--backbones",
        nargs="+",
        default=["vit_small_patch16_224", "vit_base_patch16_224", "vit_large_patch16_224"],
    )
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--dp-backbone", default="vit_small_patch16_224")
    parser.add_argument("--records", type=int, default=256)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--distractors", type=int, default=4)
    parser.add_argument("--only-extract", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.only_extract:
        print(json.dumps(_extract(args.only_extract, args.images, args.batch, args.threads)))
        return
    torch.set_num_threads(args.threads)
    load_before = round(os.getloadavg()[0], 2)
    extraction = []
    for backbone in args.backbones:
        done = subprocess.run(
            [
                *(sys.executable, "-m", __spec__.name, "--only-extract", backbone),
                *("--images", str(args.images), "--batch", str(args.batch)),
                *("--threads", str(args.threads)),
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        extraction.append(json.loads(done.stdout.strip().splitlines()[-1]))
    result = {
        "threads": args.threads,
        "dp_round": _dp_round(args),
        "extraction": extraction,
        "load_average_before": load_before,
        "load_average_after": round(os.getloadavg()[0], 2),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
