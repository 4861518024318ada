"""Randomly initialised pretrained-encoder checkpoints, written as their hubs hold them.

No model hub is reachable here, so the tests, the benchmarks and a first dry run of a
federation use real architectures with random weights, saved in the very layouts a user
downloads (and names in the run config):

- a timm model as a hub snapshot directory (``config.json`` with its architecture and
  arguments, ``model.safetensors``), written by timm's own ``save_for_hf``;
- a BERT-style ``transformers`` encoder with a WordPiece tokenizer (``save_pretrained``);
- an OpenCLIP model as a hub snapshot directory (``open_clip_config.json`` with its model
  and preprocessing configuration, ``open_clip_model.safetensors``).

Their features mean nothing: accuracy needs real pretrained weights (docs/results.md).
``fedmm random-encoders OUT`` writes the small ones and prints the run-config lines.
"""

from __future__ import annotations

import json
import string
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from fedmm.common.pretrained.encoder_spec import weights_digest
from fedmm.common.pretrained.torchvision_shim import import_torchvision

#: A small OpenCLIP configuration: a 2-block ViT on 32x32 images and a 2-block text
#: transformer with CLIP's own BPE vocabulary and 77-token context.
TINY_OPEN_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
#: A small BERT: 2 layers of width 32.
TINY_BERT = {
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 64,
    "max_position_embeddings": 64,
}


def write_random_timm(
    directory: Path, architecture: str = "test_vit", *, seed: int = 0, **model_args: Any
) -> Path:
    """A random timm ``architecture`` (with ``model_args``, e.g. ``img_size=32``) as a hub
    snapshot directory."""
    import_torchvision()
    import timm
    from timm.models import save_for_hf

    torch.manual_seed(seed)
    model = timm.create_model(architecture, pretrained=False, **model_args)
    save_for_hf(model, str(directory), model_args=model_args, safe_serialization=True)
    return Path(directory)


def _wordpiece_vocabulary(words: list[str]) -> list[str]:
    """Special tokens, whole ``words``, and every lower-case letter and digit alone and as a
    continuation piece: WordPiece can then split any ASCII word."""
    pieces = list(string.ascii_lowercase + string.digits)
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    extra = [*pieces, *(f"##{p}" for p in pieces), *string.punctuation]
    return list(dict.fromkeys([*specials, *extra, *(w.lower() for w in words)]))


def write_random_bert(directory: Path, *, words: list[str] | None = None, seed: int = 0) -> Path:
    """A random BERT-style encoder and its WordPiece tokenizer (``save_pretrained``)."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    vocabulary = _wordpiece_vocabulary(words or [])
    (directory / "vocab.txt").write_text("\n".join(vocabulary) + "\n", encoding="utf-8")
    tokenizer = BertTokenizerFast(vocab_file=str(directory / "vocab.txt"), do_lower_case=True)
    tokenizer.save_pretrained(str(directory))
    torch.manual_seed(seed)
    model = BertModel(BertConfig(vocab_size=len(vocabulary), **TINY_BERT))
    model.save_pretrained(str(directory))
    return directory


def write_random_open_clip(
    directory: Path, model_config: dict[str, Any] | None = None, *, seed: int = 0
) -> Path:
    """A random OpenCLIP model of ``model_config`` (default :data:`TINY_OPEN_CLIP`) as a hub
    snapshot directory."""
    import_torchvision()
    import open_clip

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = model_config or TINY_OPEN_CLIP
    torch.manual_seed(seed)
    model = open_clip.CLIP(**config)
    size = config["vision_cfg"]["image_size"]
    preprocess = {
        "size": [size, size],
        "mode": "RGB",
        "mean": list(open_clip.OPENAI_DATASET_MEAN),
        "std": list(open_clip.OPENAI_DATASET_STD),
        "interpolation": "bicubic",
        "resize_mode": "shortest",
    }
    (directory / "open_clip_config.json").write_text(
        json.dumps({"model_cfg": config, "preprocess_cfg": preprocess}, indent=2),
        encoding="utf-8",
    )
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()},
        str(directory / "open_clip_model.safetensors"),
    )
    return directory


def write_small_encoders(out: Path, *, image_size: int = 32) -> dict[str, dict[str, str]]:
    """The small random encoders under ``out`` (an OpenCLIP pair; a timm ViT with a BERT),
    and the run-config keys naming each pair."""
    out = Path(out)
    clip_dir = write_random_open_clip(out / "open-clip-tiny")
    vit_dir = write_random_timm(out / "timm-test-vit", "test_vit", img_size=image_size)
    bert_dir = write_random_bert(out / "bert-tiny")
    size = f"{image_size}x{image_size}"
    return {
        "open_clip": {
            "model-image-encoder": "open_clip:tiny",
            "model-text-encoder": "open_clip:tiny",
            "model-image-weights": str(clip_dir),
            "model-image-weights-sha256": weights_digest(clip_dir),
            "image-size": f"{TINY_OPEN_CLIP['vision_cfg']['image_size']}x"
            f"{TINY_OPEN_CLIP['vision_cfg']['image_size']}",
            "image-channels": "3",
        },
        "timm+hf": {
            "model-image-encoder": "timm:test_vit",
            "model-text-encoder": "hf:bert-tiny",
            "model-image-weights": str(vit_dir),
            "model-image-weights-sha256": weights_digest(vit_dir),
            "model-text-weights": str(bert_dir),
            "model-text-weights-sha256": weights_digest(bert_dir),
            "image-size": size,
            "image-channels": "3",
        },
    }
