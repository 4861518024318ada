"""No synthetic personal data of the built-in benchmark reaches a training batch.

The real data path of a simulated site with de-identification on (as ``fedmm simulate`` sets
it): ``load_site_data`` -> ``MatchingDataset`` -> ``DataLoader`` batches, on a whole site's
partition (5,400 records, about 540 with personal data).
"""

from __future__ import annotations

import re
import string
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from fedmm.client import site_data
from fedmm.client.site_data import load_site_records
from fedmm.client.training import MatchingDataset
from fedmm.common.data import captions as public_captions
from fedmm.common.data import synthetic_pii
from fedmm.common.data.benchmark import benchmark_train_records
from fedmm.common.data.captions import distractor_captions
from fedmm.common.data.fashion_mnist import DEFAULT_DATA_DIR
from fedmm.common.data.partitioning import partition_indices
from fedmm.common.federation_config import FederationConfig
from fedmm.common.tokenizer import HashingTokenizer, split_words
from fedmm.common.train_request import TrainRequest
from fedmm.simulations.simulated_sites import SimulatedSiteNodeConfig

pytestmark = pytest.mark.skipif(
    not DEFAULT_DATA_DIR.exists(), reason="needs apt-get install dataset-fashion-mnist"
)
NUM_PARTITIONS, PARTITION_ID = 10, 3
PSEUDONYM = re.compile(r"<([A-Z_]+?)(?:_([0-9a-f]{8}))?>")


def _literal(template: str) -> str:
    """A template's own text, without its ``{fields}``."""
    return " ".join(text for text, _, _, _ in string.Formatter().parse(template))


def _public_words() -> set[str]:
    """Every word the captions may hold that is not personal data: the public caption
    lexicon and templates, the personal-data templates' glue and role words, and the words
    of the pseudonym types."""
    texts = [
        *public_captions.CLASS_NAMES,
        *(s for group in public_captions.SYNONYMS for s in group),
        *map(_literal, public_captions.SINGLE_TEMPLATES),
        *map(_literal, public_captions.SCENE_TEMPLATES),
        "dark light a an photo",
        *map(_literal, synthetic_pii.PII_TEMPLATES),
        *synthetic_pii._ROLES,
        "EMAIL URL PAYMENT_CARD US_SSN IP_ADDRESS DATE PHONE PERSON".replace("_", " "),
    ]
    return {w for t in texts for w in split_words(t)}


def _injected_values(request: TrainRequest) -> dict[int, tuple[str, ...]]:
    """Position in the site's partition -> the synthetic personal values put there."""
    records = benchmark_train_records(None)  # as load_site_data calls it (one cache entry)
    injected = {
        item.index: item.values for item in synthetic_pii.synthetic_personal_data(len(records))
    }
    indices = partition_indices(
        records.labels,
        num_partitions=NUM_PARTITIONS,
        partition_id=PARTITION_ID,
        scheme=request.partition,  # type: ignore[arg-type]
        alpha=request.dirichlet_alpha,
        seed=request.seed,
    )
    return {pos: injected[int(i)] for pos, i in enumerate(indices) if int(i) in injected}


def test_no_synthetic_personal_string_reaches_a_training_batch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "site-deid-policy.toml").write_text("")  # the default policy
    site_data._memo.clear()
    request = TrainRequest.for_round(FederationConfig.from_run_config({}), 1)
    node_config = {  # as fedmm simulate gives each simulated site
        "partition-id": PARTITION_ID,
        "num-partitions": NUM_PARTITIONS,
        **SimulatedSiteNodeConfig(out_dir=str(tmp_path)).node_config(PARTITION_ID),
    }

    raw = site_data._benchmark_partition(
        request.data_dir,
        NUM_PARTITIONS,
        PARTITION_ID,
        request.partition,
        float(request.dirichlet_alpha),
        request.seed,
        0,
    )
    injected = _injected_values(request)
    assert len(raw) == 5400 and len(injected) > 400
    for pos, values in injected.items():  # the raw data does hold them: the test has teeth
        assert all(v in raw.captions[pos] for v in values)

    data = load_site_records(node_config, request)  # training and held-out records alike
    assert len(data) == len(raw) and np.array_equal(data.labels, raw.labels)

    # Strings: no caption, and no distractor candidate built from one, holds a value.
    rng = np.random.default_rng(0)
    for pos, values in injected.items():
        candidates = [
            data.captions[pos],
            *distractor_captions(data.captions[pos], count=4, rng=rng),
        ]
        for text in candidates:
            assert not any(v in text for v in values), text
    everything = "\n".join(data.captions)
    all_values = {v for values in injected.values() for v in values}
    assert not [v for v in all_values if v in everything]

    # Token ids: every id in every batch is a public word's or a pseudonym digest's, and no
    # id that only the personal values have appears at all.
    tokenizer = HashingTokenizer()
    digests = {d for c in data.captions for _, d in PSEUDONYM.findall(c) if d}
    allowed_words = _public_words() | digests
    allowed = {int(i) for i in tokenizer.encode_batch(sorted(allowed_words)).ravel()} | {0}
    pii_ids = {int(i) for v in all_values for i in tokenizer.encode(v)} - allowed
    assert len(pii_ids) > 100  # enough ids only the personal values have (768 buckets)
    loader = DataLoader(
        MatchingDataset(data, tokenizer=tokenizer, num_distractors=4, seed=0),
        batch_size=512,
    )
    seen: set[int] = set()
    for images, tokens in loader:
        assert images.dtype == torch.uint8 and tokens.shape[1:] == (5, tokenizer.max_len)
        seen.update(torch.unique(tokens).tolist())
    assert seen <= allowed, sorted(seen - allowed)[:10]
    assert not seen & pii_ids
