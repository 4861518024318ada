"""The cost of LoRA adapters at a site: one DP-SGD round with adapters on the encoders' last
block, on cached block inputs, against the frozen encoders (cached features, the head alone)
and against the adapted encoders run whole in the loop.

Prints JSON (random weights: the cost is what is measured, not accuracy). Three DP-SGD runs
(``client.secure_dp_sgd.train_dp_sgd``: Poisson batches, per-example clipping of everything
trained, CSPRNG noise; the same sampling rate and steps), with a timm ViT image encoder at
224x224 and a small BERT:

- ``frozen_cached``: the fusion head on cached output features (``model-lora-blocks`` = 0);
- ``lora_cached``: head and adapters (rank ``--rank``) on the last ``--blocks`` blocks of
  both encoders, on the cached hidden states entering them (what a site does);
- ``lora_in_the_loop``: the same model, with every sampled record's image and candidate
  captions run through the encoders up to the adapted blocks in every step (no cache).

Seconds per step of each, the trained parameters of each (what a site sends), and the
cost of computing the cache once.

Usage (2 torch threads: the site's 2 cores):
    python -m fedmm.simulations.benchmarks.lora_round [--threads 2] \
        [--backbone vit_small_patch16_224] [--records 128] [--batch 16] [--steps 3]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fedmm.common.pretrained.torchvision_shim import import_torchvision
from fedmm.simulations.benchmarks.pretrained_features import BERT_WORDS, RowsDataset, synthetic_site


class BlockInputsInTheLoop(nn.Module):
    """The adapted model with the encoders run on each batch up to the adapted blocks:
    images ``uint8`` and candidate captions as rows of a caption table."""

    def __init__(self, model: nn.Module, encoders, captions: list[str], max_tokens: int) -> None:
        super().__init__()
        self.model = model
        self.encoders = encoders  # block-input encoders (not modules: nothing of them trains)
        self.captions = captions
        self.max_tokens = max_tokens

    def forward(self, images: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            image = self.encoders.image.features(images)
            texts = [self.captions[int(r)] for r in rows.flatten()]
            states, valid = self.encoders.text.features(texts, self.max_tokens)
        shape = (*rows.shape, self.max_tokens)
        return self.model(image, states.view(*shape, -1), valid.view(shape))


def _trained(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def run(args: argparse.Namespace) -> dict:
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
    from fedmm.common.pretrained.encoder_blocks import (
        block_input_image_encoder,
        block_input_text_encoder,
    )
    from fedmm.common.pretrained.encoder_spec import EncoderSpec, weights_digest
    from fedmm.common.pretrained.frozen_encoders import (
        FrozenEncoders,
        load_frozen_encoders,
        resolve_model_config,
    )
    from fedmm.common.pretrained.lora_adapters import build_fusion_model
    from fedmm.common.secure_random import fresh_random_bytes
    from fedmm.common.tokenizer import HashingTokenizer
    from fedmm.simulations.random_encoders import write_random_bert, write_random_timm

    records, distractors, _ = synthetic_site(args.records)
    captions = records.captions
    result: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        vit = write_random_timm(Path(tmp) / "vit", args.backbone)
        bert = write_random_bert(Path(tmp) / "bert", words=BERT_WORDS)
        encoders = load_frozen_encoders(
            EncoderSpec("timm", args.backbone, str(vit), weights_digest(vit)),
            EncoderSpec("hf", "bert-tiny", str(bert), weights_digest(bert)),
        )
        frozen = resolve_model_config(
            ModelConfig(
                image_height=224,
                image_width=224,
                image_channels=3,
                max_len=16,
                image_encoder=f"timm:{args.backbone}",
                text_encoder="hf:bert-tiny",
            ),
            encoders,
        )
        adapted = resolve_model_config(
            replace(frozen, lora_blocks=args.blocks, lora_rank=args.rank), encoders
        )
        cache = {}
        for name, config in (("frozen", frozen), ("lora", adapted)):
            started = time.perf_counter()
            cache[name] = compute_site_features(
                records,
                encoders,
                config=config,
                settings=distractors,
                num_distractors=args.distractors,
                rng=np.random.default_rng(0),
            )
            result[f"{name}_cache_s"] = round(time.perf_counter() - started, 2)
            result[f"{name}_cache_mb"] = round(
                sum(a.nbytes for a in cache[name].to_arrays().values()) / 2**20, 1
            )
        pools = distractor_pools(
            captions,
            settings=distractors,
            tokenizer=HashingTokenizer.for_model(frozen),
            num_distractors=args.distractors,
            rng=np.random.default_rng(1),
        )
        table, caption_row, distractor_rows = caption_table(captions, pools)
        loop_rows = SiteFeatures(
            image=cache["lora"].image[:, :1],
            text=cache["lora"].text[:1],
            text_valid=cache["lora"].text_valid[:1],
            caption_row=caption_row,
            distractor_rows=distractor_rows,
        )
        prefix = FrozenEncoders(
            block_input_image_encoder(encoders.image, adapted.image_lora_blocks),
            block_input_text_encoder(encoders.text, adapted.text_lora_blocks),
        )
        rate = args.batch / args.records
        for name in ("frozen_cached", "lora_cached", "lora_in_the_loop"):
            torch.manual_seed(0)
            trained = build_fusion_model(frozen if name == "frozen_cached" else adapted, encoders)
            if name == "lora_in_the_loop":
                model: nn.Module = BlockInputsInTheLoop(trained, prefix, table, frozen.max_len)
                dataset = RowsDataset(
                    records.images,
                    FeatureMatchingDataset(loop_rows, num_distractors=args.distractors, seed=0),
                )
            else:
                model = trained
                features = cache["frozen" if name == "frozen_cached" else "lora"]
                dataset = FeatureMatchingDataset(features, num_distractors=args.distractors, seed=0)
            optimizer = torch.optim.SGD([p for p in trained.parameters() if p.requires_grad], 0.1)
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
            result[f"{name}_s_per_step"] = round((time.perf_counter() - started) / args.steps, 3)
            result[f"{name}_trained_parameters"] = _trained(trained)
    result["lora_cached_vs_in_the_loop_speedup"] = round(
        result["lora_in_the_loop_s_per_step"] / result["lora_cached_s_per_step"], 1
    )
    result["lora_cached_vs_frozen_slowdown"] = round(
        result["lora_cached_s_per_step"] / result["frozen_cached_s_per_step"], 1
    )
    return {
        "backbone": args.backbone,
        "text_encoder": "BERT, 2 layers of width 32 (random)",
        "adapted_blocks": args.blocks,
        "rank": args.rank,
        "lora_targets": json.loads(adapted.lora_targets),
        "records": args.records,
        "expected_batch": args.batch,
        "steps": args.steps,
        "num_distractors": args.distractors,
        **result,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--backbone", default="vit_small_patch16_224")
    parser.add_argument("--blocks", type=int, default=1)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--records", type=int, default=128)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--distractors", type=int, default=4)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load_before = round(os.getloadavg()[0], 2)
    result = {"threads": args.threads, **run(args)}
    result["load_average_before"] = load_before
    result["load_average_after"] = round(os.getloadavg()[0], 2)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
