# ruff: noqa: E402 (torchvision is imported through its shim before timm and open_clip)
"""A site with LoRA adapters on its encoders' last blocks (``model-lora-blocks``).

Its feature cache holds the hidden states entering the first adapted block, keyed on the
number of adapted blocks (reused when nothing changed, rebuilt when N does); a DP-SGD round
trains the fusion head and the adapters, sends exactly those, and leaves every frozen weight
bit-identical; the per-example gradients through the adapted OpenCLIP and BERT blocks
(candidate captions flattened into the blocks' batch) equal single-example backward passes;
federated evaluation runs the held-out records through the adapted blocks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from fedmm.common.pretrained.torchvision_shim import import_torchvision

import_torchvision()
pytest.importorskip("open_clip")
pytest.importorskip("peft")

from fedmm.client.feature_training import FeatureMatchingDataset, evaluate_features
from fedmm.client.per_example_gradients import PerExampleGradients
from fedmm.client.privacy_ledger import PrivacyLedger, epsilon_of
from fedmm.client.privacy_policy import SitePrivacyPolicy
from fedmm.client.training_round import run_training_round
from fedmm.common.data.dataset import NO_LABEL, ImageTextDataset
from fedmm.common.federation_config import FederationConfig
from fedmm.common.loss import matching_loss
from fedmm.common.pretrained.fusion_model import FeatureFusionMatcher
from fedmm.common.pretrained.lora_adapters import build_fusion_model
from fedmm.common.train_request import TrainRequest
from tests.client.test_pretrained_site import BANK_TEXT, COLOURS, _cached
from tests.common.random_weights import write_test_weights
from tests.common.test_lora_adapters import load, run_config


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return write_test_weights(tmp_path_factory.mktemp("weights"), ["red", "car", "number"])


def _records(count: int, seed: int = 0) -> ImageTextDataset:
    rng = np.random.default_rng(seed)
    return ImageTextDataset(
        images=rng.integers(0, 256, (count, 32, 32, 3), dtype=np.uint8),
        captions=[f"a {COLOURS[i % 6]} car number {i}" for i in range(count)],
        labels=np.full(count, NO_LABEL, dtype=np.int64),
    )


def _own_captions(cached) -> np.ndarray:
    """The states of the records' own captions (distractor pools are drawn anew)."""
    return cached.features.text[cached.features.caption_row]


def _site_run_config(weights, pair: str, bank: Path | None = None, **lora: object) -> dict:
    return {
        **run_config(weights, pair, **lora),
        "caption-bank": str(bank) if bank else "",
        "distractor-word-lists": "colours",
        "num-distractors": 2,
        "batch-size": 8,
    }


def test_the_cache_holds_block_inputs_keyed_on_the_adapted_blocks(
    weights: dict[str, Path], tmp_path: Path
) -> None:
    records, cache = _records(6), tmp_path / "cache"
    encoders, frozen = load(_site_run_config(weights, "clip"))
    _encoders, adapted = load(_site_run_config(weights, "clip", blocks=1))
    _encoders, image_only = load(_site_run_config(weights, "clip", blocks=1, encoders="image"))
    first = _cached(records, encoders, frozen, cache)
    assert first.built and not _cached(records, encoders, frozen, cache).built
    lora = _cached(records, encoders, adapted, cache)
    assert lora.built and lora.entry != first.entry
    again = _cached(records, encoders, adapted, cache)
    assert not again.built and again.entry == lora.entry
    np.testing.assert_array_equal(again.features.image, lora.features.image)
    # block inputs: the class token too, and other values than the output tokens
    assert lora.features.image.shape[1] == first.features.image.shape[1] + 1
    assert not np.allclose(lora.features.image[:, 1:], first.features.image, atol=1e-2)
    assert not np.allclose(_own_captions(lora), _own_captions(first), atol=1e-2)
    # one entry per data source (the newest replaces the older): back to N = 0 rebuilds
    # the frozen features, the same as before
    back = _cached(records, encoders, frozen, cache)
    assert back.built and back.entry == first.entry
    np.testing.assert_array_equal(back.features.image, first.features.image)
    one_side = _cached(records, encoders, image_only, cache)
    assert one_side.built
    np.testing.assert_array_equal(_own_captions(one_side), _own_captions(first))
    np.testing.assert_array_equal(one_side.features.image, lora.features.image)


@pytest.mark.parametrize(
    ("pair", "sides"),
    [("clip", "both"), ("vit+bert", "both"), ("resnet+bert", "text")],
)
def test_a_dp_sgd_round_trains_the_adapters_and_leaves_frozen_weights_bit_identical(
    weights: dict[str, Path], tmp_path: Path, pair: str, sides: str
) -> None:
    """A CNN image encoder takes no adapters: with ``model-lora-encoders = text`` the text
    encoder's last block is adapted and the image side stays frozen features."""
    bank = tmp_path / "bank.txt"
    bank.write_text(BANK_TEXT)
    settings = _site_run_config(weights, pair, bank, blocks=1, encoders=sides)
    settings.update({"epsilon": 8.0, "num-server-rounds": 1, "learning-rate": 1.0})
    encoders, config = load(settings)
    frozen_before = {
        side: {k: v.clone() for k, v in getattr(encoders, side).module.state_dict().items()}
        for side in ("image", "text")
    }
    records = _records(48)
    features = _cached(records, encoders, config, tmp_path / "cache").features
    request = TrainRequest.for_round(FederationConfig.from_run_config(settings), 1)
    torch.manual_seed(0)
    model = build_fusion_model(config, encoders)
    global_state = {k: v.clone() for k, v in model.state_dict().items()}
    frozen_tail = {
        n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad
    }
    assert frozen_tail  # the copied blocks' frozen weights are in the model ...
    assert not set(frozen_tail) & set(global_state)  # ... but never in its state
    head_names = set(FeatureFusionMatcher(config).state_dict())
    adapter_names = set(global_state) - head_names
    assert adapter_names and all(".lora_A." in n or ".lora_B." in n for n in adapter_names)
    ledger = PrivacyLedger()
    outcome = run_training_round(
        global_state=global_state,
        request=request,
        data=records,
        policy=SitePrivacyPolicy(),
        ledger=ledger,
        features=features,
        model_config=config,
        encoders=encoders,
    )
    assert outcome.update is not None, outcome.refusal
    assert set(outcome.update) == head_names | adapter_names  # what is sent and summed
    assert all(torch.isfinite(v).all() for v in outcome.update.values())
    adapted = ("image_tail", "text_tail") if sides == "both" else ("text_tail",)
    assert {n.split(".")[0] for n in adapter_names} == set(adapted)
    for side in adapted:
        changed = [
            n for n in adapter_names if n.startswith(side) and outcome.update[n].abs().max() > 0
        ]
        assert any(".lora_B." in n for n in changed), f"{side}'s adapters were not trained"
    assert 0 < epsilon_of(ledger.history, 1e-5) <= 8.0 * (1 + 1e-9)
    for side in ("image", "text"):  # the site's frozen encoders: bit-identical
        after = getattr(encoders, side).module.state_dict()
        assert all(torch.equal(after[k], v) for k, v in frozen_before[side].items())
    trained = {k: global_state[k] + outcome.update[k] for k in global_state}
    counts = evaluate_features(
        global_state=trained,
        config=config,
        encoders=encoders,
        held_out=features.subset(np.arange(10)),
        num_distractors=2,
        with_bank=True,
        rng=np.random.default_rng(0),
    )
    assert counts.records == 10 and counts.bank_records == 10
    with pytest.raises(RuntimeError, match="Missing key"):  # the adapters are part of it
        evaluate_features(
            global_state={k: v for k, v in trained.items() if k in head_names},
            config=config,
            encoders=encoders,
            held_out=features.subset(np.arange(10)),
            num_distractors=2,
            with_bank=False,
        )


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
@pytest.mark.parametrize("pair", ["clip", "vit+bert"])
def test_per_example_gradients_through_adapted_blocks_equal_single_example_passes(
    weights: dict[str, Path], tmp_path: Path, pair: str
) -> None:
    """Head and adapters together, in float64; the candidates' captions run through the
    text blocks as rows of one batch, grouped back by example for the gradients."""
    encoders, config = load(_site_run_config(weights, pair, blocks=1, rank=2))
    features = _cached(_records(5), encoders, config, tmp_path / "cache").features
    dataset = FeatureMatchingDataset(features, num_distractors=2, seed=0)
    items = [dataset[i] for i in range(5)]
    image, text, valid = (torch.stack(c) for c in zip(*items, strict=True))
    assert not valid.all()  # padding in the batch
    torch.manual_seed(0)
    model = build_fusion_model(config, encoders).double()
    with torch.no_grad():  # B starts at zero (then A has no gradient): values as after training
        for name, parameter in model.named_parameters():
            if ".lora_B." in name:
                parameter.normal_(std=0.1)
    image, text = image.double(), text.double()
    with PerExampleGradients(model) as tape:
        tape.backward(matching_loss(model(image, text, valid)))
        norms = tape.squared_norms(torch.float64).sqrt()
        per_example = [tape.weighted_sums(torch.eye(5, dtype=torch.float64)[i]) for i in range(5)]
    for i in range(5):
        model.zero_grad(set_to_none=True)
        one = slice(i, i + 1)
        matching_loss(model(image[one], text[one], valid[one])).sum().backward()
        expected = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        adapters = [n for n in expected if ".lora_" in n]
        assert adapters and all(expected[n].abs().max() > 0 for n in adapters)
        for name, grad in expected.items():
            torch.testing.assert_close(per_example[i][name], grad, rtol=1e-8, atol=1e-10)
        flat = torch.cat([g.flatten() for g in expected.values()]).norm()
        torch.testing.assert_close(norms[i], flat)
