"""Tiny randomly initialised checkpoints of real architectures, written as users' files are
(``fedmm.simulations.random_encoders``), for the pretrained-encoder tests."""

from __future__ import annotations

from pathlib import Path

from fedmm.simulations.random_encoders import (
    write_random_bert,
    write_random_open_clip,
    write_random_timm,
)


def write_test_weights(root: Path, bert_words: list[str]) -> dict[str, Path]:
    """A timm ViT (32 px) and ResNet, a BERT whose vocabulary adds ``bert_words``, and an
    OpenCLIP pair, under ``root``."""
    return {
        "vit": write_random_timm(root / "vit", "test_vit", img_size=32),
        "resnet": write_random_timm(root / "resnet", "test_resnet"),
        "bert": write_random_bert(root / "bert", words=bert_words),
        "clip": write_random_open_clip(root / "clip"),
    }
