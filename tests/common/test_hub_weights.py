"""Frozen weights named by a hub repository (``hf-hub:<org>/<name>[@<revision>]``) resolve to
a snapshot in the Hugging Face cache and are then pinned and loaded as a local directory.

No network: a temporary cache is laid out as ``huggingface_hub`` lays it out
(``models--<org>--<name>/refs/<branch>``, ``blobs/``, ``snapshots/<commit>/`` of links to the
blobs) around a small random OpenCLIP checkpoint, and the run config is resolved in a fresh
process with ``HF_HUB_CACHE`` set and ``HF_HUB_OFFLINE=1`` (``huggingface_hub`` reads both
when it is imported), through the coordinator's own path (``initial_model``) and
``fedmm weights-digest``.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fedmm.common.federation_config import ConfigError
from fedmm.common.pretrained.encoder_spec import FrozenWeightsError, weights_digest
from fedmm.common.pretrained.hub_weights import (
    HubName,
    is_hub_name,
    parse_hub_name,
    resolve_hub_weights,
    site_copy_of_hub_weights,
)

BIN = Path(sys.executable).parent
COMMIT = "0123456789abcdef0123456789abcdef01234567"
REPO = "fedmm-test/open-clip-tiny"


def test_hub_names_parse_with_an_optional_revision_and_bad_forms_name_the_form() -> None:
    assert parse_hub_name("hf-hub:org/name") == HubName("org/name", "main")
    assert parse_hub_name("hf-hub:org/name@v1.0") == HubName("org/name", "v1.0")
    assert parse_hub_name(f"hf-hub:org/name@{COMMIT}").revision == COMMIT
    assert not is_hub_name("/srv/weights/name") and is_hub_name("hf-hub:org/name")
    assert resolve_hub_weights("/srv/weights/name") == "/srv/weights/name"
    for bad in ("hf-hub:name", "hf-hub:org/name@", "hf-hub:/name", "hf-hub:org/na me"):
        with pytest.raises(FrozenWeightsError, match=r"hf-hub:<org>/<name>@<revision>"):
            parse_hub_name(bad)


def test_a_site_uses_its_weights_dir_copy_of_a_hub_name_else_the_name(tmp_path: Path) -> None:
    name = f"hf-hub:{REPO}@{COMMIT}"
    assert site_copy_of_hub_weights(name, None) == name
    assert site_copy_of_hub_weights(name, str(tmp_path)) == name  # no copy: resolve it
    (tmp_path / "open-clip-tiny").mkdir()
    assert site_copy_of_hub_weights(name, str(tmp_path)) == str(tmp_path / "open-clip-tiny")


def _hub_cache(cache: Path, repo: str, snapshot: Path, *, branch: str = "main") -> Path:
    """``snapshot``'s files in ``cache`` as huggingface_hub keeps a download of ``repo``."""
    org, name = repo.split("/")
    root = cache / f"models--{org}--{name}"
    (root / "refs").mkdir(parents=True)
    (root / "refs" / branch).write_text(COMMIT)
    for file in sorted(p for p in snapshot.rglob("*") if p.is_file()):
        data = file.read_bytes()
        blob = root / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = root / "snapshots" / COMMIT / file.relative_to(snapshot)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    return root / "snapshots" / COMMIT


_RESOLVE = """
import json, sys
from fedmm.common.federation_config import FederationConfig
from fedmm.common.pretrained.encoder_spec import FrozenWeightsError
from fedmm.server.federation import initial_model
for run_config in json.loads(sys.argv[1]):
    try:
        model = initial_model(FederationConfig.from_run_config(run_config))
    except FrozenWeightsError as error:
        print(json.dumps({"error": str(error)}))
    else:
        print(json.dumps({"image_feature_dim": model.config.image_feature_dim,
                          "text_feature_dim": model.config.text_feature_dim}))
"""


def _resolve(run_configs: list[dict[str, str]], env: dict[str, str]) -> list[dict[str, object]]:
    """What the coordinator's own path makes of each run config, in one fresh process."""
    done = subprocess.run(
        [sys.executable, "-c", _RESOLVE, json.dumps(run_configs)],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads(line) for line in done.stdout.strip().splitlines()[-len(run_configs) :]]


@pytest.mark.slow
def test_a_run_config_naming_a_hub_repo_resolves_it_from_the_cache_offline_and_checks_the_pin(
    tmp_path: Path,
) -> None:
    from fedmm.common.pretrained.torchvision_shim import import_torchvision

    import_torchvision()  # before open_clip imports it (the CPU torch build)
    pytest.importorskip("open_clip")
    from fedmm.simulations.random_encoders import TINY_OPEN_CLIP, write_random_open_clip

    snapshot = _hub_cache(tmp_path / "hub", REPO, write_random_open_clip(tmp_path / "clip"))
    pin = weights_digest(tmp_path / "clip")
    assert weights_digest(snapshot) == pin  # a snapshot of links pins as a copy of its files
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    size = TINY_OPEN_CLIP["vision_cfg"]["image_size"]
    run_config = {
        "model-image-encoder": "open_clip:tiny",
        "model-text-encoder": "open_clip:tiny",
        "model-image-weights": f"hf-hub:{REPO}",
        "model-image-weights-sha256": pin,
        "image-size": f"{size}x{size}",
        "image-channels": "3",
    }
    width = TINY_OPEN_CLIP["vision_cfg"]["width"]
    text_width = TINY_OPEN_CLIP["text_cfg"]["width"]
    expected = {"image_feature_dim": width, "text_feature_dim": text_width}
    pinned_commit = {**run_config, "model-image-weights": f"hf-hub:{REPO}@{COMMIT}"}
    other_pin = {**run_config, "model-image-weights-sha256": "0" * 64}
    missing = {**run_config, "model-image-weights": "hf-hub:fedmm-test/not-cached"}
    by_branch, by_commit, refused, not_cached = _resolve(
        [run_config, pinned_commit, other_pin, missing], env
    )
    assert by_branch == expected and by_commit == expected
    assert "the run pins " + "0" * 64 in str(refused["error"]), refused
    assert str(snapshot) in str(refused["error"]), refused  # checked on the resolved files
    error = str(not_cached["error"])
    assert "could not be resolved on this machine" in error, error
    assert "copy the snapshot directory" in error and "weights-dir as not-cached/" in error

    digest = subprocess.run(
        [str(BIN / "fedmm"), "weights-digest", f"hf-hub:{REPO}"],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert digest.returncode == 0 and digest.stdout.strip() == pin, digest.stderr
    digest = subprocess.run(
        [str(BIN / "fedmm"), "weights-digest", "hf-hub:fedmm-test/not-cached"],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert digest.returncode == 2 and "copy the snapshot directory" in digest.stderr
    assert "Traceback" not in digest.stderr


def test_a_site_resolves_the_run_s_hub_name_to_its_own_copy_or_leaves_it_to_the_hub(
    tmp_path: Path,
) -> None:
    from fedmm.client.pretrained_site import PRETRAINED_WEIGHTS_DIR, site_encoder_specs
    from fedmm.common.federation_config import FederationConfig
    from fedmm.common.train_request import TrainRequest

    name = f"hf-hub:{REPO}@{COMMIT}"
    run_config = {
        "model-image-encoder": "open_clip:tiny",
        "model-text-encoder": "open_clip:tiny",
        "model-image-weights": name,
        "model-image-weights-sha256": "a" * 64,
        "image-size": "32x32",
        "image-channels": "3",
    }
    request = TrainRequest.for_round(FederationConfig.from_run_config(run_config), 1)
    folder = tmp_path / "weights"
    folder.mkdir()
    node_config = {PRETRAINED_WEIGHTS_DIR: str(folder)}
    image, text = site_encoder_specs(node_config, request)
    assert image.weights == text.weights == name  # no copy: the site resolves the name
    (folder / "open-clip-tiny").mkdir()
    image, text = site_encoder_specs(node_config, request)
    assert image.weights == text.weights == str(folder / "open-clip-tiny")
    assert image.sha256 == "a" * 64  # the run's pin, checked on the copy
    bad = {**run_config, "model-image-weights": "hf-hub:no-org"}
    with pytest.raises(ConfigError, match="hf-hub:<org>/<name>"):
        FederationConfig.from_run_config(bad)  # refused before any site is asked
