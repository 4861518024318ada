"""The coordinator's training loop: sample, run the round, step, evaluate, checkpoint, report.

What differs between kinds of round (plain FedAvg, SecAgg+, distributed DP) is the run's
mode (``server.round_modes``), chosen once; this loop is the same for all of them. After the
rounds ``eval-every`` names and after the last, the global model is evaluated at the sites on
their held-out records (``server.federated_evaluation``, summed under SecAgg+) and, when the
run's images are the built-in benchmark's, on its test split by the coordinator
(``server.evaluation``, ``coordinator-eval``). With ``average-decay`` > 0 the model evaluated and
released is an exponential moving average of the rounds' global models
(``common.parameter_averaging``: post-processing, no privacy cost); training continues from
the last global model.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from flwr.serverapp import Grid
from safetensors.torch import save_file

from fedmm.common.data.benchmark import benchmark_test_set
from fedmm.common.federation_config import ConfigError, FederationConfig
from fedmm.common.model import CrossAttentionMatcher
from fedmm.common.parameter_averaging import average_parameters
from fedmm.common.tokenizer import HashingTokenizer
from fedmm.common.train_request import model_config_of
from fedmm.server.aggregation import RoundAggregate, wait_for_sites
from fedmm.server.checkpoints import load_latest_checkpoint, save_checkpoint
from fedmm.server.evaluation import evaluate
from fedmm.server.federated_evaluation import evaluation_sample, federated_evaluation_for
from fedmm.server.round_modes import RoundMode, round_mode_for
from fedmm.server.run_report import append_metrics, truncate_metrics, write_summary_and_report

logger = logging.getLogger(__name__)

#: Checkpoint server-state keys of the averaged model's tensors.
AVERAGE_PREFIX = "averaged/"

#: Builds the run's mode from the config, the model's trainable size and the sites connected.
ModeChoice = Callable[..., RoundMode]


def run_federation(
    grid: Grid, config: FederationConfig, *, choose_mode: ModeChoice = round_mode_for
) -> dict:
    """Run all rounds; returns the summary. Outputs go to ``config.out_dir``."""
    out_dir = Path(config.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(config.seed)
    model = initial_model(config)
    start_round, server_state = _resume(config, out_dir, model)
    averaged = {
        k.removeprefix(AVERAGE_PREFIX): server_state.pop(k)
        for k in list(server_state)
        if k.startswith(AVERAGE_PREFIX)
    } or {k: v.detach().clone() for k, v in model.state_dict().items()}
    coordinator_eval = _coordinator_evaluation(config, model)
    federated_eval = federated_evaluation_for(config)
    node_ids = wait_for_sites(
        grid,
        max(config.min_available_sites, config.min_train_sites),
        setting="min-available-sites / min-train-sites",
    )
    dimension = sum(p.numel() for p in model.parameters() if p.requires_grad)
    mode = choose_mode(config, dimension=dimension, num_sites=len(node_ids))
    mode.server_state.update(server_state)
    rng = random.Random(config.seed)
    failed_rounds = 0  # rounds in a row in which sites failed and none trained or refused
    for server_round in range(1, config.num_server_rounds + 1):
        sampled = mode.sample(node_ids, rng)
        if server_round < start_round:
            continue  # keep the sampling sequence identical on resume
        started = time.monotonic()
        weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
        aggregate = mode.run_round(
            grid, server_round=server_round, node_ids=sampled, weights=weights
        )
        row = _round_row(config, server_round, sampled, aggregate)
        failed_rounds = failed_rounds + 1 if _sites_failed_only(row) else 0
        if aggregate.mean_update() is None or aggregate.aborted:
            row["aborted"] = aggregate.aborted or "no site trained this round"
            logger.warning("round %d: model unchanged (%s)", server_round, row["aborted"])
        else:
            model.load_state_dict(mode.step(weights, aggregate, server_round=server_round))
        if config.average_decay:
            averaged = average_parameters(
                averaged, model.state_dict(), decay=config.average_decay, step=server_round
            )
        if config.evaluates_after(server_round):
            released = _released(config, model, averaged)
            if coordinator_eval is not None:
                row.update(coordinator_eval(released))
            if federated_eval is not None:
                weights = {k: v.detach().clone() for k, v in released.state_dict().items()}
                row["federated_eval"] = federated_eval.run(
                    grid,
                    server_round=server_round,
                    node_ids=evaluation_sample(config, node_ids, server_round),
                    weights=weights,
                )
        save_checkpoint(
            out_dir,
            server_round,
            {k: v.numpy() for k, v in model.state_dict().items()},
            server_state={
                **{k: v.numpy() for k, v in mode.server_state.items()},
                **{
                    AVERAGE_PREFIX + k: v.numpy()
                    for k, v in averaged.items()
                    if config.average_decay
                },
            },
        )
        row["wall_s"] = round(time.monotonic() - started, 3)
        append_metrics(out_dir, row)
        _log_round(row)
        if config.max_failed_rounds and failed_rounds >= config.max_failed_rounds:
            raise RuntimeError(
                f"stopped after round {server_round}: in {failed_rounds} rounds in a row sites "
                "failed and none trained or refused (max-failed-rounds); see the sites' logs "
                "(in simulation, run.log: Ray may have killed a site's process for memory). "
                "The last checkpoint is kept: fix the cause and continue with --resume"
            )
    _save_model(out_dir, _released(config, model, averaged))
    note = mode.privacy_statement()
    return write_summary_and_report(out_dir, config=config.to_run_config(), privacy_note=note)


def initial_model(config: FederationConfig) -> torch.nn.Module:
    """The run's model before round 1: the built-in matcher, or, with frozen pretrained
    encoders, the fusion head over their features (with LoRA adapters on copies of their
    last blocks when ``model-lora-blocks`` > 0). The coordinator loads the encoders (its
    own copy, checked against the run's SHA-256 pins) only to learn their feature widths,
    preprocessing and tokenizer and to copy the adapted blocks; it never runs them."""
    model_config = model_config_of(config)
    if not model_config.pretrained:
        return CrossAttentionMatcher(model_config)
    from fedmm.common.federation_config import encoder_specs_of
    from fedmm.common.pretrained.frozen_encoders import load_frozen_encoders, resolve_model_config
    from fedmm.common.pretrained.lora_adapters import build_fusion_model

    encoders = load_frozen_encoders(*encoder_specs_of(config))
    try:  # an image size or LoRA blocks the encoders cannot take: the key and the fix
        resolved = resolve_model_config(model_config, encoders)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    return build_fusion_model(resolved, encoders)


def _released(
    config: FederationConfig, model: torch.nn.Module, averaged: dict[str, torch.Tensor]
) -> torch.nn.Module:
    """The model to evaluate and release: ``model``, or with ``average-decay`` a copy of it
    holding the ``averaged`` weights."""
    if not config.average_decay:
        return model
    released = copy.deepcopy(model)
    released.load_state_dict(averaged)
    return released


def _coordinator_evaluation(
    config: FederationConfig, model: CrossAttentionMatcher
) -> Callable[[CrossAttentionMatcher], dict[str, float]] | None:
    """The coordinator's own evaluation on the benchmark's test split, or None when the run
    does not ask for it (``coordinator-eval``: ``auto`` skips it for images that are not the
    benchmark's 28x56 grayscale)."""
    if not config.coordinator_evaluates:
        logger.info(
            "coordinator evaluation off (coordinator-eval = %s, image-size %s, %d channel(s))",
            config.coordinator_eval,
            config.image_size,
            config.image_channels,
        )
        return None
    test_set = benchmark_test_set(config.data_dir or None, num_scenes=config.eval_scenes)
    test_set = test_set.first_singles(config.eval_single_items)
    tokenizer = HashingTokenizer(
        max_len=model.config.max_len, num_buckets=model.config.vocab_buckets
    )
    return lambda current: evaluate(current, test_set, tokenizer).to_dict()


def _resume(
    config: FederationConfig, out_dir: Path, model: CrossAttentionMatcher
) -> tuple[int, dict[str, torch.Tensor]]:
    """The first round to run and the mode's saved state: after the last checkpoint when
    the run resumes (the model is loaded from it), else round 1 with no metrics kept."""
    checkpoint = load_latest_checkpoint(out_dir) if config.resume else None
    if checkpoint is None:
        (out_dir / "metrics.jsonl").unlink(missing_ok=True)
        return 1, {}
    model.load_state_dict({k: torch.from_numpy(v) for k, v in checkpoint.weights.items()})
    truncate_metrics(out_dir, after_round=checkpoint.server_round)
    logger.info("resuming after round %d from %s", checkpoint.server_round, out_dir)
    server_state = {k: torch.from_numpy(v) for k, v in checkpoint.server_state.items()}
    return checkpoint.server_round + 1, server_state


def _round_row(
    config: FederationConfig, server_round: int, sampled: list[int], aggregate: RoundAggregate
) -> dict[str, Any]:
    row: dict[str, Any] = {
        "round": server_round,
        "sites_sampled": len(sampled),
        "sites_trained": aggregate.count("trained"),
        "sites_refused": aggregate.count("refused"),
        "sites_failed": aggregate.count("failed"),
        # the largest epsilon bound a site committed to (not its spend): every site that
        # trained is within its bound
        "epsilon_bound_max": aggregate.epsilon_max if config.private else math.inf,
    }
    if aggregate.exchange_seconds is not None:  # wall time of each SecAgg+ exchange
        row["secagg_stage_s"] = {k: round(v, 3) for k, v in aggregate.exchange_seconds.items()}
    return row


def _sites_failed_only(row: dict[str, Any]) -> bool:
    """Sites failed in the round and none trained or refused."""
    return row["sites_failed"] > 0 and row["sites_trained"] == 0 and row["sites_refused"] == 0


def _log_round(row: dict[str, Any]) -> None:
    logger.info(
        "round %d: accuracy %.4f, R@1 i2t %.3f t2i %.3f, epsilon bound %.3f, "
        "trained %d refused %d failed %d, %.1f s",
        row["round"],
        row.get("accuracy", math.nan),
        row.get("r_at_1_i2t", math.nan),
        row.get("r_at_1_t2i", math.nan),
        row["epsilon_bound_max"],
        row["sites_trained"],
        row["sites_refused"],
        row["sites_failed"],
        row["wall_s"],
    )
    federated = row.get("federated_eval")
    if federated and "records" in federated:
        logger.info(
            "round %d: federated evaluation on %d held-out records at %d sites: R@10 i2t "
            "%.3f (chance %.3f, shuffled %.3f), R@10 t2i %.3f",
            row["round"],
            federated["records"],
            federated["sites_evaluated"],
            federated.get("r_at_10_i2t", math.nan),
            federated.get("chance_r_at_10", math.nan),
            federated.get("r_at_10_i2t_shuffled", math.nan),
            federated.get("r_at_10_t2i", math.nan),
        )


def _save_model(out_dir: Path, model: CrossAttentionMatcher) -> None:
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()},
        str(out_dir / "model.safetensors"),
    )
    (out_dir / "model-config.json").write_text(json.dumps(model.config.to_dict(), indent=2))
