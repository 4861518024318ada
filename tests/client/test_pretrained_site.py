# ruff: noqa: E402 (torchvision is imported through its shim before timm and open_clip)
"""A site with frozen pretrained encoders: its features are cached once and reused, rebuilt
when the weights, the preprocessing or the data change; its copy of the weights must be the
run's (else it refuses with ``frozen-weights``); a DP-SGD round on the cached features
trains the fusion head alone, whose per-example gradients are exact."""

from __future__ import annotations

import json
import shutil
import stat
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from fedmm.common.pretrained.torchvision_shim import import_torchvision

import_torchvision()
pytest.importorskip("open_clip")

from fedmm.client import pretrained_site, site_data
from fedmm.client.feature_cache import FEATURES_DIR, cached_site_features
from fedmm.client.feature_training import FeatureMatchingDataset, evaluate_features
from fedmm.client.per_example_gradients import PerExampleGradients
from fedmm.client.pretrained_site import PRETRAINED_WEIGHTS_DIR, load_pretrained_site
from fedmm.client.privacy_ledger import PrivacyLedger, epsilon_of
from fedmm.client.privacy_policy import SitePrivacyPolicy
from fedmm.client.training_round import run_training_round
from fedmm.common.data.caption_bank import CaptionBank
from fedmm.common.data.dataset import NO_LABEL, ImageTextDataset
from fedmm.common.data.openclipart import OPENCLIPART_ROOT
from fedmm.common.distractors import DistractorSettings
from fedmm.common.federation_config import FederationConfig, encoder_specs_of
from fedmm.common.loss import matching_loss
from fedmm.common.pretrained.encoder_spec import weights_digest
from fedmm.common.pretrained.frozen_encoders import load_frozen_encoders, resolve_model_config
from fedmm.common.pretrained.fusion_model import FeatureFusionMatcher
from fedmm.common.site_refusal import RefusalCode, SiteRefusal
from fedmm.common.train_request import TrainRequest, model_config_of
from fedmm.simulations.random_encoders import write_random_open_clip
from tests.client.site_fixtures import small_colour_drawings

COLOURS = ("red", "blue", "green", "yellow", "black", "white")
BANK_TEXT = "".join(
    f"a public drawing of a {c} house number {i}\n" for i in range(8) for c in COLOURS
)
SETTINGS = DistractorSettings(
    word_lists=("colours",), bank=CaptionBank.from_bytes(BANK_TEXT.encode(), source="test")
)


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_random_open_clip(tmp_path_factory.mktemp("weights") / "clip")


def _run_config(clip: Path, bank: Path | None = None, **extra: object) -> dict:
    return {
        "caption-bank": str(bank) if bank else "",
        "model-image-encoder": "open_clip:tiny",
        "model-text-encoder": "open_clip:tiny",
        "model-image-weights": str(clip),
        "model-image-weights-sha256": weights_digest(clip),
        "image-size": "32x32",
        "image-channels": 3,
        "model-width": 16,
        "distractor-word-lists": "colours",
        "num-distractors": 2,
        "batch-size": 8,
        **extra,
    }


def _records(count: int, seed: int = 0) -> ImageTextDataset:
    rng = np.random.default_rng(seed)
    return ImageTextDataset(
        images=rng.integers(0, 256, (count, 32, 32, 3), dtype=np.uint8),
        captions=[f"a {COLOURS[i % 6]} car number {i}" for i in range(count)],
        labels=np.full(count, NO_LABEL, dtype=np.int64),
    )


def _resolved(run_config: dict):
    config = FederationConfig.from_run_config(run_config)
    encoders = load_frozen_encoders(*encoder_specs_of(config))
    return encoders, resolve_model_config(model_config_of(config), encoders)


def _cached(records, encoders, config, cache: Path):
    return cached_site_features(
        records,
        encoders,
        config=config,
        settings=SETTINGS,
        num_distractors=2,
        cache_dir=cache,
        secret=b"s" * 32,
        source=("test",),
    )


def test_features_are_reused_when_nothing_changed_and_rebuilt_when_anything_did(
    clip_dir: Path, tmp_path: Path
) -> None:
    encoders, config = _resolved(_run_config(clip_dir))
    records, cache = _records(6), tmp_path / "cache"
    first = _cached(records, encoders, config, cache)
    assert first.built and len(first.features) == 6
    assert first.features.image.shape == (6, 16, 64)
    text = first.features
    # each record's pool: its own caption's colour swaps (5 other colours) over two draws
    assert ((text.distractor_rows >= 0).sum(1) >= 2).all()
    assert stat.S_IMODE((cache / FEATURES_DIR).stat().st_mode) == 0o700
    # Encrypted at rest: every data file private, none holding the features in the clear.
    plain = first.features.image.astype(np.float32).tobytes()[:64]
    assert len(list(first.entry.glob("*.bin"))) == 2  # the index and the arrays
    for path in first.entry.glob("*.bin"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path.name
        assert plain not in path.read_bytes() and b"safetensors" not in path.name.encode()

    again = _cached(records, encoders, config, cache)
    assert not again.built and again.entry == first.entry
    np.testing.assert_array_equal(again.features.image, first.features.image)
    np.testing.assert_array_equal(again.features.distractor_rows, text.distractor_rows)

    edited = ImageTextDataset(
        records.images, [*records.captions[:-1], "a purple car"], records.labels
    )
    assert _cached(edited, encoders, config, cache).built  # the data
    preprocessing = replace(config, image_preprocessing=config.image_preprocessing + " ")
    assert _cached(records, encoders, preprocessing, cache).built  # the preprocessing
    other = write_random_open_clip(tmp_path / "other-clip", seed=1)
    other_encoders, other_config = _resolved(_run_config(other))
    rebuilt = _cached(records, other_encoders, other_config, cache)  # the weights
    assert rebuilt.built
    assert not np.allclose(rebuilt.features.image, first.features.image)
    # a new entry of the same dataset replaces the older ones
    assert [p.name for p in (cache / FEATURES_DIR).iterdir()] == [rebuilt.entry.name]


def test_a_tampered_feature_file_is_detected_and_rebuilt_never_used(
    clip_dir: Path, tmp_path: Path
) -> None:
    encoders, config = _resolved(_run_config(clip_dir))
    records, cache = _records(4), tmp_path / "cache"
    first = _cached(records, encoders, config, cache)
    (largest,) = sorted(first.entry.glob("*.bin"), key=lambda p: p.stat().st_size)[-1:]
    blob = bytearray(largest.read_bytes())
    blob[len(blob) // 2] ^= 0x01  # one bit of the features' ciphertext
    largest.write_bytes(bytes(blob))
    again = _cached(records, encoders, config, cache)
    assert again.built  # recomputed, not read from the altered file
    np.testing.assert_allclose(again.features.image, first.features.image, rtol=1e-5)


def test_a_dp_sgd_round_on_cached_features_trains_the_fusion_head_only(
    clip_dir: Path, tmp_path: Path
) -> None:
    bank = tmp_path / "bank.txt"
    bank.write_text(BANK_TEXT)
    run_config = _run_config(clip_dir, bank, epsilon=8.0, **{"num-server-rounds": 1})
    encoders, config = _resolved(run_config)
    records = _records(48)
    features = _cached(records, encoders, config, tmp_path / "cache").features
    request = TrainRequest.for_round(FederationConfig.from_run_config(run_config), 1)
    torch.manual_seed(0)
    global_state = FeatureFusionMatcher(config).state_dict()
    ledger = PrivacyLedger()
    outcome = run_training_round(
        global_state=global_state,
        request=request,
        data=records,
        policy=SitePrivacyPolicy(),
        ledger=ledger,
        features=features,
        model_config=config,
    )
    assert outcome.update is not None, outcome.refusal
    assert set(outcome.update) == set(global_state)  # the head, nothing of the encoders
    assert all(torch.isfinite(v).all() for v in outcome.update.values())
    assert any(float(v.abs().max()) > 0 for v in outcome.update.values())
    assert 0 < epsilon_of(ledger.history, 1e-5) <= 8.0 * (1 + 1e-9)
    counts = evaluate_features(
        global_state=global_state,
        config=config,
        held_out=features.subset(np.arange(10)),
        num_distractors=2,
        with_bank=True,
        rng=np.random.default_rng(0),
    )
    assert counts.records == 10 and counts.bank_records == 10


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
def test_the_fusion_heads_per_example_gradients_equal_single_example_backward_passes(
    clip_dir: Path, tmp_path: Path
) -> None:
    """The head's layers (Linear, LayerNorm) are all covered by the one-backward path; an
    example's gradient equals its own backward pass, with padded caption tokens."""
    encoders, config = _resolved(_run_config(clip_dir))
    features = _cached(_records(5), encoders, config, tmp_path / "cache").features
    dataset = FeatureMatchingDataset(features, num_distractors=2, seed=0)
    items = [dataset[i] for i in range(5)]
    image, text, valid = (torch.stack(c) for c in zip(*items, strict=True))
    assert not valid.all()  # padding in the batch
    torch.manual_seed(0)
    model = FeatureFusionMatcher(config).double()
    image, text = image.double(), text.double()
    with PerExampleGradients(model) as tape:
        tape.backward(matching_loss(model(image, text, valid)))
        norms = tape.squared_norms(torch.float64).sqrt()
        per_example = [tape.weighted_sums(torch.eye(5, dtype=torch.float64)[i]) for i in range(5)]
    for i in range(5):
        model.zero_grad(set_to_none=True)
        one = slice(i, i + 1)
        matching_loss(model(image[one], text[one], valid[one])).sum().backward()
        expected = {n: p.grad for n, p in model.named_parameters()}
        for name, grad in expected.items():
            torch.testing.assert_close(per_example[i][name], grad, rtol=1e-8, atol=1e-10)
        flat = torch.cat([g.flatten() for g in expected.values()]).norm()
        torch.testing.assert_close(norms[i], flat)


@pytest.mark.skipif(
    not (OPENCLIPART_ROOT / "png").is_dir(), reason="needs apt-get install openclipart-png"
)
def test_a_site_refuses_a_run_whose_frozen_weights_differ_from_its_copy(
    clip_dir: Path, tmp_path: Path
) -> None:
    root = tmp_path / "site"
    root.mkdir()
    lines = []
    for i, path in enumerate(small_colour_drawings(6)):
        shutil.copyfile(path, root / f"{i}.png")
        lines.append(json.dumps({"file_name": f"{i}.png", "text": f"a red drawing {i}"}))
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    own = tmp_path / "site-weights"
    shutil.copytree(clip_dir, own / clip_dir.name)
    node_config = {
        "imagefolder": str(root),
        "site-secret": str(tmp_path / "secret"),
        "deid-cache-dir": str(tmp_path / "deid"),
        PRETRAINED_WEIGHTS_DIR: str(own),
    }
    bank = tmp_path / "bank.txt"
    bank.write_text(BANK_TEXT)
    config = FederationConfig.from_run_config(_run_config(clip_dir, bank))
    request = TrainRequest.for_round(config, 1)
    site_data._memo.clear()
    pretrained_site._memo.clear()
    site = load_pretrained_site(node_config, request)
    assert not isinstance(site, SiteRefusal), site
    assert len(site.train) + len(site.held_out) == 6
    assert (tmp_path / "deid" / FEATURES_DIR).is_dir()  # beside the de-identified data

    weights_file = own / clip_dir.name / "open_clip_model.safetensors"
    tensors = bytearray(weights_file.read_bytes())
    tensors[-1] ^= 1  # one bit of the site's copy
    weights_file.write_bytes(bytes(tensors))
    refused = load_pretrained_site(node_config, request)
    assert isinstance(refused, SiteRefusal) and refused.code == RefusalCode.FROZEN_WEIGHTS
    missing = load_pretrained_site({**node_config, PRETRAINED_WEIGHTS_DIR: str(tmp_path)}, request)
    assert isinstance(missing, SiteRefusal) and missing.code == RefusalCode.FROZEN_WEIGHTS
