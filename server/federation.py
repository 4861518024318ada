"""The coordinator's training loop: sample, aggregate, step, evaluate, checkpoint, report."""

from __future__ import annotations

import json
import logging
import math
import random
import time
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord
from flwr.serverapp import Grid
from safetensors.torch import save_file

from common.data.benchmark import benchmark_test_set
from common.federation_config import FederationConfig
from common.model import CrossAttentionMatcher
from common.tokenizer import HashingTokenizer
from common.train_request import TrainRequest, model_config_of
from server import distributed_dp
from server.aggregation import FedAvgAggregation, RoundAggregation, wait_for_sites
from server.checkpoints import load_latest_checkpoint, save_checkpoint
from server.evaluation import evaluate
from server.run_report import append_metrics, truncate_metrics, write_summary_and_report
from server.secure_aggregation import SecAggPlusAggregation, SecAggSettings

logger = logging.getLogger(__name__)


def sample_sites(
    node_ids: list[int], *, fraction: float, minimum: int, rng: random.Random
) -> list[int]:
    count = min(len(node_ids), max(minimum, math.ceil(fraction * len(node_ids))))
    return sorted(rng.sample(node_ids, count))


def privacy_note(config: FederationConfig) -> str:
    if not config.private:
        return "DP off (epsilon = inf): no formal privacy guarantee for the model."
    return (
        f"record-level (epsilon, delta)-DP at each site under add/remove of one record, "
        f"epsilon <= {config.epsilon:g} requested, delta <= {config.delta:g}, Opacus RDP "
        "accountant, cumulative over the site's ledger (DP-SGD with Poisson sampling and "
        "Gaussian noise from a CSPRNG, and the site's noisy record count); a site's own "
        "policy may make it stricter. epsilon_bound_max is the largest bound a site "
        "committed to (sites report their bound, not their exact spend, which is a function "
        "of their record count; each site's exact epsilon is in its ledger)."
    )


def run_federation(
    grid: Grid,
    config: FederationConfig,
    *,
    aggregation: RoundAggregation | None = None,
) -> dict:
    """Run all rounds; returns the summary. Outputs go to ``config.out_dir``."""
    aggregation = aggregation or (
        SecAggPlusAggregation(SecAggSettings.from_federation_config(config))
        if config.secure_aggregation
        else FedAvgAggregation()
    )
    out_dir = Path(config.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(config.seed)
    model = CrossAttentionMatcher(model_config_of(config))
    start_round = 1
    velocity: dict[str, torch.Tensor] = {}  # distributed DP: the coordinator's momentum
    checkpoint = load_latest_checkpoint(out_dir) if config.resume else None
    if checkpoint is not None:
        model.load_state_dict({k: torch.from_numpy(v) for k, v in checkpoint.weights.items()})
        velocity = {k: torch.from_numpy(v) for k, v in checkpoint.server_state.items()}
        start_round = checkpoint.server_round + 1
        truncate_metrics(out_dir, after_round=checkpoint.server_round)
        logger.info("resuming after round %d from %s", checkpoint.server_round, out_dir)
    elif (out_dir / "metrics.jsonl").exists():
        (out_dir / "metrics.jsonl").unlink()

    test_set = benchmark_test_set(config.data_dir or None, num_scenes=config.eval_scenes)
    test_set = test_set.first_singles(config.eval_single_items)
    tokenizer = HashingTokenizer(
        max_len=model.config.max_len, num_buckets=model.config.vocab_buckets
    )
    node_ids = wait_for_sites(
        grid,
        max(config.min_available_sites, config.min_train_sites),
        setting="min-available-sites / min-train-sites",
    )
    plan = None
    if config.dp_mode == "distributed":  # every site takes part in every round
        plan = distributed_dp.plan_run(
            config,
            dimension=sum(p.numel() for p in model.parameters() if p.requires_grad),
            num_sites=len(node_ids),
        )
        if not isinstance(aggregation, SecAggPlusAggregation):
            raise ValueError("distributed DP needs SecAgg+ (secure-aggregation = true)")
        aggregation.settings = distributed_dp.secagg_settings(aggregation.settings, plan)
        logger.info(distributed_dp.privacy_statement(plan, num_sites=len(node_ids)))
    rng = random.Random(config.seed)
    for server_round in range(1, config.num_server_rounds + 1):
        sampled = sample_sites(
            node_ids, fraction=config.fraction_train, minimum=config.min_train_sites, rng=rng
        )
        if plan is not None:
            sampled = list(node_ids)
        if server_round < start_round:
            continue  # keep the sampling sequence identical on resume
        started = time.monotonic()
        weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
        request = TrainRequest.for_round(config, server_round)
        aggregate = aggregation.run_round(
            grid,
            node_ids=sampled,
            global_arrays=ArrayRecord(weights),
            train_config=ConfigRecord(
                request.to_config() | (plan.to_config() if plan is not None else {})
            ),
            timeout=config.round_timeout,
        )
        mean_update = aggregate.mean_update()
        row: dict = {
            "round": server_round,
            "sites_sampled": len(sampled),
            "sites_trained": aggregate.count("trained"),
            "sites_refused": aggregate.count("refused"),
            "sites_failed": aggregate.count("failed"),
            # the largest epsilon bound a site committed to (not its spend): every site
            # that trained is within its bound
            "epsilon_bound_max": aggregate.epsilon_max if config.private else math.inf,
        }
        if isinstance(aggregation, SecAggPlusAggregation):  # wall time of each exchange
            exchanges = aggregation.last_round.exchange_seconds
            row["secagg_stage_s"] = {k: round(v, 3) for k, v in exchanges.items()}
        if mean_update is None or aggregate.aborted:
            reason = aggregate.aborted or "no site trained this round"
            logger.warning("round %d: model unchanged (%s)", server_round, reason)
            row["aborted"] = reason
        elif plan is not None:  # distributed DP: one SGD step on the revealed noisy sum
            model.load_state_dict(
                distributed_dp.noisy_gradient_step(
                    weights,
                    aggregate.weighted_update_sum,
                    total_records=aggregate.total_weight,
                    plan=plan,
                    learning_rate=config.learning_rate_in_round(server_round),
                    momentum=config.momentum,
                    velocity=velocity,
                )
            )
        else:
            new_weights = {
                k: weights[k] + config.server_learning_rate * torch.from_numpy(mean_update[k])
                for k in weights
            }
            model.load_state_dict(new_weights)
        evaluated = server_round % config.eval_every == 0
        if evaluated or server_round == config.num_server_rounds:
            result = evaluate(model, test_set, tokenizer)
            row.update(result.to_dict())
        save_checkpoint(
            out_dir,
            server_round,
            {k: v.numpy() for k, v in model.state_dict().items()},
            server_state={k: v.numpy() for k, v in velocity.items()},
        )
        row["wall_s"] = round(time.monotonic() - started, 3)
        append_metrics(out_dir, row)
        logger.info(
            "round %d: accuracy %.4f, R@1 i2t %.3f t2i %.3f, epsilon bound %.3f, "
            "trained %d refused %d failed %d, %.1f s",
            server_round,
            row.get("accuracy", math.nan),
            row.get("r_at_1_i2t", math.nan),
            row.get("r_at_1_t2i", math.nan),
            row["epsilon_bound_max"],
            row["sites_trained"],
            row["sites_refused"],
            row["sites_failed"],
            row["wall_s"],
        )
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()},
        str(out_dir / "model.safetensors"),
    )
    (out_dir / "model-config.json").write_text(json.dumps(model.config.to_dict(), indent=2))
    note = (
        privacy_note(config)
        if plan is None
        else distributed_dp.privacy_statement(plan, num_sites=len(node_ids))
    )
    return write_summary_and_report(out_dir, config=config.to_run_config(), privacy_note=note)
