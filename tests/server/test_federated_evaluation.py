"""Federated evaluation on the coordinator's side: through real SecAgg+ stages (X25519,
AES-GCM, Shamir; ``tests.server.in_process_grid``), the coordinator learns exactly the sum of
the sites' counts and never one site's; a declining site is counted as refused; the
coordinator's own benchmark evaluation is skipped for another image geometry, and a 64x64
RGB run with real OpenClipart sites evaluates at the sites instead of crashing."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Context, Message
from flwr.supercore.task_identity import TaskIdentity

from fedmm.client.app import build_client_app
from fedmm.client.secure_aggregation import SiteContribution
from fedmm.common.data.openclipart import OPENCLIPART_ROOT
from fedmm.common.federated_eval import EvaluationCounts
from fedmm.common.federation_config import ConfigError, FederationConfig
from fedmm.common.site_refusal import RefusalCode, SiteRefusal
from fedmm.server.federated_evaluation import evaluation_sample, federated_evaluation_for
from fedmm.server.federation import run_federation
from fedmm.simulations.simulated_sites import POLICY_FILE, write_site_policy
from tests.server.in_process_grid import InProcessGrid

NODES = [11, 2**63 + 5, 40, 77]


@pytest.fixture(autouse=True)
def _task_identity() -> None:
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 7, 1, 1


def _site_counts(rng: np.random.Generator) -> EvaluationCounts:
    n = int(rng.integers(5, 60))
    hits = sorted(int(h) for h in rng.integers(0, n + 1, size=3))
    return EvaluationCounts(
        records=n,
        i2t_hits_1=hits[0],
        i2t_hits_5=hits[1],
        i2t_hits_10=hits[2],
        t2i_hits_1=hits[0] // 2,
        t2i_hits_5=hits[1] // 2,
        t2i_hits_10=hits[2] // 2,
        i2t_shuffled_hits_10=min(n, 10) // 2,
        chance_hits_10=min(n, 10),
    )


def _grid(counts: dict[int, EvaluationCounts], declines: set[int] = frozenset()) -> InProcessGrid:
    def contribute(msg: Message, context: Context) -> SiteContribution | SiteRefusal:
        if context.node_id in declines:
            return SiteRefusal(RefusalCode.PRIVACY_POLICY, "declines")
        site = counts[context.node_id]
        return SiteContribution(
            vector=site.to_vector(), weight=site.records, metrics={}, epsilon_bound=0.0
        )

    return InProcessGrid(
        NODES,
        contribute=contribute,
        integer_vector=True,
        result_length=EvaluationCounts.length(),
    )


def test_the_coordinator_learns_exactly_the_sum_of_the_sites_counts() -> None:
    rng = np.random.default_rng(3)
    counts = {node: _site_counts(rng) for node in NODES}
    grid = _grid(counts)
    evaluation = federated_evaluation_for(FederationConfig())
    assert evaluation is not None
    row = evaluation.run(grid, server_round=4, node_ids=NODES, weights={"w": torch.zeros(3)})
    total = sum(counts.values(), EvaluationCounts())
    assert row["sites_evaluated"] == 4 and "aborted" not in row, row
    for key, value in total.rates().items():
        assert row[key] == value, key
    assert {"evaluate.secagg_setup", "evaluate.secagg_unmask"} <= set(grid.sent_types())
    assert not any(kind.startswith("train") for kind in grid.sent_types())

    # The coordinator's view: no reply carries one site's counts. The masked vectors are
    # not the plain ones, and nothing else in any reply is an array or a count.
    plain = [c.to_vector() for c in counts.values()]
    for reply in grid.received:
        for name, record in reply.content.array_records.items():
            assert name == "masked"
            (masked,) = record.to_numpy_ndarrays()
            assert not any(np.array_equal(masked[: len(p)], p) for p in plain)
            assert not any(int(masked[len(plain[0])]) == c.records for c in counts.values())
        for name, record in reply.content.metric_records.items():
            assert name == "privacy" and dict(record) == {"epsilon": 0.0}


def test_a_declining_site_is_refused_and_left_out_of_the_sum() -> None:
    rng = np.random.default_rng(4)
    counts = {node: _site_counts(rng) for node in NODES}
    grid = _grid(counts, declines={NODES[1]})
    evaluation = federated_evaluation_for(FederationConfig())
    assert evaluation is not None
    row = evaluation.run(grid, server_round=1, node_ids=NODES, weights={"w": torch.zeros(3)})
    assert row["sites_refused"] == 1 and row["sites_evaluated"] == 3
    kept = sum((counts[n] for n in NODES if n != NODES[1]), EvaluationCounts())
    assert row["records"] == kept.records and row["r_at_10_i2t"] == kept.rates()["r_at_10_i2t"]


def test_coordinator_evaluation_follows_the_image_geometry() -> None:
    assert FederationConfig().coordinator_evaluates
    rgb = {"image-size": "64x64", "image-channels": 3, "model-patch-size": 8}
    assert not FederationConfig.from_run_config(rgb).coordinator_evaluates
    assert not FederationConfig.from_run_config({"coordinator-eval": "off"}).coordinator_evaluates
    with pytest.raises(ConfigError, match=r"coordinator-eval.*64x64"):
        FederationConfig.from_run_config({**rgb, "coordinator-eval": "on"})
    every = FederationConfig.from_run_config({"eval-every": 0, "num-server-rounds": 3})
    assert [every.evaluates_after(r) for r in (1, 2, 3)] == [False, False, True]


@pytest.mark.skipif(not (OPENCLIPART_ROOT / "png").is_dir(), reason="needs openclipart-png")
@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
@pytest.mark.filterwarnings("ignore:Optimal order is the largest alpha")
def test_a_64x64_rgb_run_skips_the_coordinators_evaluation_and_evaluates_at_the_sites(
    tmp_path: Path,
) -> None:
    files = sorted((OPENCLIPART_ROOT / "png").rglob("*.png"))
    out = tmp_path / "run"
    out.mkdir()
    write_site_policy(out / POLICY_FILE, max_epsilon=8.0, delta=1e-5)
    grid = InProcessGrid(NODES[:3], app=build_client_app())
    for index, node in enumerate(NODES[:3]):
        folder = tmp_path / f"site-{index}"
        folder.mkdir()
        lines = []
        for i, path in enumerate(files[index * 15 : (index + 1) * 15]):
            shutil.copyfile(path, folder / f"{i}.png")
            lines.append(json.dumps({"file_name": f"{i}.png", "text": f"clipart {path.stem}"}))
        (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
        grid.contexts[node].node_config.update(
            {
                "imagefolder": str(folder),
                "policy-file": str(out / POLICY_FILE),
                "site-secret": str(tmp_path / f"secret-{index}"),
                "deid-cache-dir": str(tmp_path / f"cache-{index}"),
                "ledger-file": str(tmp_path / f"ledger-{index}.json"),
            }
        )
    config = FederationConfig.from_run_config(
        {
            "image-size": "64x64",
            "image-channels": 3,
            "model-patch-size": 16,
            "model-width": 8,
            "distractor-word-lists": "none",
            "caption-bank": str(_bank(tmp_path)),
            "num-distractors": 2,
            "batch-size": 8,
            "epsilon": 8.0,
            "num-server-rounds": 1,
            "min-available-sites": 3,
            "min-train-sites": 3,
            "eval-fraction": 0.4,
            "out-dir": str(out),
        }
    )
    run_federation(grid, config)  # type: ignore[arg-type]
    (row,) = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert "accuracy" not in row and "eval_loss" not in row  # the benchmark needs 28x56 grey
    federated = row["federated_eval"]
    assert federated["sites_evaluated"] == 3 and federated["records"] > 3, federated
    assert 0 < federated["chance_r_at_10"] <= 1 and "caption_bank_accuracy" in federated


def _bank(tmp_path: Path) -> Path:
    bank = tmp_path / "bank.txt"
    bank.write_text("".join(f"public caption number {i}\n" for i in range(30)))
    return bank


def test_fraction_evaluate_samples_a_stable_share_of_the_sites() -> None:
    node_ids = list(range(100, 1100))
    config = FederationConfig(fraction_evaluate=0.1, seed=5)
    first = evaluation_sample(config, node_ids, 3)
    assert len(first) == 100 and set(first) <= set(node_ids)
    assert evaluation_sample(config, node_ids, 3) == first  # a resumed run asks the same
    assert evaluation_sample(config, node_ids, 4) != first  # each evaluation draws anew
    # At least the fewest sites a secure sum releases; all of them by default.
    assert len(evaluation_sample(FederationConfig(fraction_evaluate=0.001), node_ids, 1)) == 3
    assert evaluation_sample(FederationConfig(), node_ids, 1) == node_ids
    with pytest.raises(ConfigError, match="fraction-evaluate"):
        FederationConfig.from_run_config({"fraction-evaluate": 0})


def test_a_run_whose_sites_only_fail_stops_after_max_failed_rounds(tmp_path: Path) -> None:
    def never_reached(msg: Message, context: Context) -> SiteContribution:
        raise AssertionError("every setup message fails before it reaches the site")

    def run(max_failed: int) -> tuple[list[dict], str]:
        grid = InProcessGrid(NODES[:3], contribute=never_reached)
        grid.fault = lambda _kind, _node: "error"  # every site fails every message
        out = tmp_path / f"run-{max_failed}"
        config = FederationConfig.from_run_config(
            {
                "num-server-rounds": 5,
                "min-available-sites": 3,
                "min-train-sites": 3,
                "max-failed-rounds": max_failed,
                "coordinator-eval": "off",
                "federated-eval": False,
                "out-dir": str(out),
            }
        )
        error = ""
        try:
            run_federation(grid, config)  # type: ignore[arg-type]
        except RuntimeError as stopped:
            error = str(stopped)
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        return rows, error

    rows, error = run(2)
    assert [r["round"] for r in rows] == [1, 2] and all(r["sites_failed"] == 3 for r in rows)
    assert "max-failed-rounds" in error and "--resume" in error
    rows, error = run(0)  # 0: never stop
    assert [r["round"] for r in rows] == [1, 2, 3, 4, 5] and error == ""
