"""What a site computes for each task a request declares (``common.site_task``), and where.

- ``local_dp_sgd``: DP-SGD on the site's de-identified records under its own policy and
  ledger (``client.training_round``); the model update goes back in the clear (plain
  FedAvg) or into a SecAgg+ sum.
- ``distributed_dp_step``: one DP-SGD step of distributed DP (``client.distributed_dp_step``):
  the integer gradient sum plus this site's Skellam share. Only inside a SecAgg+ sum: a
  share carries a fraction of the noise the guarantee needs, so the site refuses it in a
  plain exchange, whatever the request declares.
- ``federated_eval``: the global model's retrieval counts on the site's held-out records
  (``client.federated_evaluation``), only inside a SecAgg+ sum, and only when the site's
  policy allows evaluation (``allow-evaluation``).

Each task reads the site's data, policy and ledger (``client.ledger_session``) from its node
config, never from the request. torch and opacus are imported inside the functions that
compute only: a site runner started for one message imports no more than it needs. A new task is one
function here and one entry in :data:`SECURE_SUM_TASKS`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from flwr.app import Context, Message

from fedmm.client.ledger_session import ledger_file, ledger_session
from fedmm.client.privacy_policy import SitePrivacyPolicy
from fedmm.client.secure_aggregation import Contributor, SiteContribution
from fedmm.common.federated_eval import EvaluationCounts
from fedmm.common.secure_round import (
    METRIC_EPSILON_BOUND,
    METRIC_NUM_EXAMPLES,
    METRIC_STEPS,
    RECORD_SECAGG,
    flatten_update,
)
from fedmm.common.site_refusal import RefusalCode, SiteRefusal
from fedmm.common.site_task import RECORD_ARRAYS, RECORD_CONFIG, RECORD_PLAN, SiteTask
from fedmm.common.train_request import TrainRequest

if TYPE_CHECKING:  # torch: imported only by the functions that train
    from fedmm.client.privacy_ledger import PrivacyLedger
    from fedmm.client.training_round import RoundOutcome

logger = logging.getLogger(__name__)

#: Node config key: torch's intra-op threads while the site trains (1: on 2 shared cores,
#: two threads made training 10x slower).
TORCH_THREADS = "torch-threads"


def torch_threads(node_config: Mapping[str, Any]) -> int:
    """The site's ``torch-threads`` (default 1); a clear error naming the key otherwise."""
    value = node_config.get(TORCH_THREADS, 1)
    try:
        threads = int(value)
    except (TypeError, ValueError):
        threads = 0
    if isinstance(value, bool) or threads < 1 or threads != float(value):
        raise ValueError(f"node config {TORCH_THREADS} = {value!r}: use an integer >= 1")
    return threads


def _train_request(msg: Message) -> TrainRequest | SiteRefusal:
    try:
        return TrainRequest.from_config(dict(msg.content.config_records[RECORD_CONFIG]))
    except (KeyError, TypeError, ValueError) as error:
        return SiteRefusal(RefusalCode.BAD_REQUEST, f"train request rejected: {error}")


def train_local_dp_sgd(msg: Message, context: Context) -> RoundOutcome | SiteRefusal:
    """DP-SGD on the site's data from the request's global model (``run_training_round``);
    the ledger is saved when it changed (the site trained, or drew its noisy count)."""
    request = _train_request(msg)
    if isinstance(request, SiteRefusal):
        return request
    import torch

    from fedmm.client.site_data import load_site_split
    from fedmm.client.training_round import run_training_round

    torch.set_num_threads(torch_threads(context.node_config))
    if request.model_config().pretrained:  # frozen encoders: the cached features
        from fedmm.client.pretrained_site import load_pretrained_site

        site = load_pretrained_site(context.node_config, request)
        if isinstance(site, SiteRefusal):
            logger.warning("site refuses round %s: %s", request.server_round, site)
            return site
        inputs: dict[str, Any] = {
            "data": site.train_records,
            "features": site.train,
            "model_config": site.config,
            "encoders": site.encoders,
        }
        counts = (len(site.train_records), len(site.held_out))
    else:
        split = load_site_split(context.node_config, request)
        inputs = {"data": split.train}
        counts = (len(split.train), len(split.held_out))
    with ledger_session(context) as ledger:
        outcome = run_training_round(
            global_state=msg.content.array_records[RECORD_ARRAYS].to_torch_state_dict(),
            request=request,
            policy=SitePrivacyPolicy.for_site(context.node_config),
            ledger=ledger,
            run_id=context.run_id,
            persistent_ledger=ledger_file(context) is not None,
            **inputs,
        )
        if outcome.update is not None:
            audit_round(
                context,
                request,
                task=SiteTask.LOCAL_DP_SGD,
                records=counts,
                ledger=ledger,
                private=math.isfinite(outcome.epsilon),
            )
    if outcome.update is None:
        logger.warning("site refuses round %s: %s", request.server_round, outcome.refusal)
        return outcome.refusal or SiteRefusal(RefusalCode.BAD_REQUEST)
    return outcome


def local_dp_sgd_contribution(msg: Message, context: Context) -> SiteContribution | SiteRefusal:
    """The DP-SGD update as one flat vector in the global arrays' order."""
    outcome = train_local_dp_sgd(msg, context)
    if isinstance(outcome, SiteRefusal):
        return outcome
    assert outcome.update is not None
    keys = list(msg.content.array_records[RECORD_ARRAYS].keys())
    return SiteContribution(
        vector=flatten_update({k: v.numpy() for k, v in outcome.update.items()}, keys),
        weight=int(outcome.metrics[METRIC_NUM_EXAMPLES]),
        metrics={METRIC_STEPS: int(outcome.metrics[METRIC_STEPS])},
        epsilon_bound=float(outcome.metrics[METRIC_EPSILON_BOUND]),
    )


def distributed_dp_contribution(msg: Message, context: Context) -> SiteContribution | SiteRefusal:
    """One distributed-DP step (``client.distributed_dp_step``): the integer gradient sum
    plus this site's Skellam share, in Z_(2^b); the plan is the request's ``plan`` record."""
    request = _train_request(msg)
    if isinstance(request, SiteRefusal):
        return request
    from fedmm.common.distributed_dp.plan import DistributedDPPlan

    if request.model_config().pretrained:
        return SiteRefusal(
            RefusalCode.BAD_REQUEST,
            "distributed DP is not supported with pretrained encoders (dp-mode = 'local')",
        )
    try:
        plan = DistributedDPPlan.from_config(dict(msg.content.config_records[RECORD_PLAN]))
        bit_width = int(msg.content.config_records[RECORD_SECAGG]["bit_width"])
    except (KeyError, TypeError, ValueError) as error:
        return SiteRefusal(RefusalCode.BAD_REQUEST, f"distributed-DP request rejected: {error}")
    import torch

    from fedmm.client.distributed_dp_step import run_distributed_dp_step
    from fedmm.client.site_data import load_site_split

    torch.set_num_threads(torch_threads(context.node_config))
    split = load_site_split(context.node_config, request)
    with ledger_session(context) as ledger:
        outcome = run_distributed_dp_step(
            global_state=msg.content.array_records[RECORD_ARRAYS].to_torch_state_dict(),
            request=request,
            plan=plan,
            data=split.train,
            policy=SitePrivacyPolicy.for_site(context.node_config),
            ledger=ledger,
            bit_width=bit_width,
            run_id=context.run_id,
            persistent_ledger=ledger_file(context) is not None,
        )
        if outcome.integers is not None:
            audit_round(
                context,
                request,
                task=SiteTask.DISTRIBUTED_DP_STEP,
                records=(len(split.train), len(split.held_out)),
                ledger=ledger,
            )
    if outcome.integers is None:
        return outcome.refusal or SiteRefusal(RefusalCode.BAD_REQUEST)
    return SiteContribution(
        vector=outcome.integers,
        weight=outcome.num_records,
        metrics={METRIC_STEPS: 1},
        epsilon_bound=outcome.epsilon_bound,
        honest_sites=outcome.honest_sites,
    )


def federated_eval_contribution(msg: Message, context: Context) -> SiteContribution | SiteRefusal:
    """The global model's counts on the site's held-out records (``common.federated_eval``),
    an unsigned integer vector; its weight is the number of held-out records. The site's
    policy may decline (``allow-evaluation = false``): refused with ``privacy-policy``."""
    request = _train_request(msg)
    if isinstance(request, SiteRefusal):
        return request
    if not SitePrivacyPolicy.for_site(context.node_config).allow_evaluation:
        return SiteRefusal(
            RefusalCode.PRIVACY_POLICY,
            "this site's policy declines federated evaluation (allow-evaluation = false)",
        )
    import torch

    from fedmm.client.federated_evaluation import evaluate_held_out
    from fedmm.client.site_data import load_site_split

    torch.set_num_threads(torch_threads(context.node_config))
    global_state = msg.content.array_records[RECORD_ARRAYS].to_torch_state_dict()
    if request.model_config().pretrained:  # frozen encoders: the cached features
        from fedmm.client.feature_training import evaluate_features
        from fedmm.client.pretrained_site import load_pretrained_site

        site = load_pretrained_site(context.node_config, request)
        if isinstance(site, SiteRefusal):
            logger.warning("site refuses evaluation in round %s: %s", request.server_round, site)
            return site
        counts = evaluate_features(
            global_state=global_state,
            config=site.config,
            encoders=site.encoders,
            held_out=site.held_out,
            num_distractors=int(request.num_distractors),
            with_bank=request.distractor_settings().bank is not None,
        )
        records = (len(site.train_records), len(site.held_out))
    else:
        split = load_site_split(context.node_config, request)
        counts = evaluate_held_out(
            global_state=global_state, request=request, held_out=split.held_out
        )
        records = (len(split.train), len(split.held_out))
    logger.info("round %s: evaluated on %d held-out records", request.server_round, counts.records)
    audit_round(context, request, task=SiteTask.FEDERATED_EVAL, records=records, ledger=None)
    return SiteContribution(
        vector=counts.to_vector(), weight=int(counts.records), metrics={}, epsilon_bound=0.0
    )


def audit_round(
    context: Context,
    request: TrainRequest,
    *,
    task: SiteTask,
    records: tuple[int, int],
    ledger: PrivacyLedger | None,
    private: bool = True,
) -> None:
    """Append the round this site served to its audit log (``client.site_audit``): the
    records it used and held out (``records``: their counts), the epsilon of the run and of
    its lifetime (``ledger``: None for an evaluation, which spends none; inf for a round
    without DP), the de-identification policy's digest."""
    from fedmm.client.record_withdrawals import read_withdrawals, withdrawals_path
    from fedmm.client.site_audit import (
        EVENT_ROUND,
        audit_event,
        audit_log_path,
        policy_digest,
        record_audit_event,
    )
    from fedmm.client.site_data import site_deid_settings

    node_config = context.node_config
    if audit_log_path(node_config) is None:
        return
    epsilons: dict[str, float | None] = {"epsilon_run": None, "epsilon_lifetime": None}
    if ledger is not None:
        delta = ledger.delta
        epsilons = {
            "epsilon_run": ledger.this_run().epsilon(delta) if private else math.inf,
            "epsilon_lifetime": ledger.epsilon(delta) if private else math.inf,
        }
    withdrawals = withdrawals_path(node_config)
    event = audit_event(
        node_config,
        event=EVENT_ROUND,
        run_id=context.run_id,
        server_round=request.server_round,
        task=task.value,
        records_used=None if task is SiteTask.FEDERATED_EVAL else records[0],
        records_held_out=records[1],
        deid_policy_sha256=policy_digest(site_deid_settings(node_config).load_policy().to_dict()),
        withdrawn_records=0 if withdrawals is None else len(read_withdrawals(withdrawals)),
        **epsilons,
    )
    record_audit_event(node_config, event)


@dataclass(frozen=True)
class SecureSumTask:
    """A task whose result goes into a SecAgg+ sum."""

    contribute: Contributor
    integer_vector: bool  # the result is in Z_(2^b) already (else reals, quantised)
    #: Entries of the result (None: the global model's, an update).
    result_length: int | None = None


#: A task whose result may go back in the clear (plain FedAvg): its update.
PlainTask = Callable[[Message, Context], "RoundOutcome | SiteRefusal"]

#: The tasks this site runs in a plain ``train`` exchange.
PLAIN_TASKS: dict[SiteTask, PlainTask] = {SiteTask.LOCAL_DP_SGD: train_local_dp_sgd}
#: The tasks this site runs at the setup of a SecAgg+ round.
SECURE_SUM_TASKS: dict[SiteTask, SecureSumTask] = {
    SiteTask.LOCAL_DP_SGD: SecureSumTask(local_dp_sgd_contribution, integer_vector=False),
    SiteTask.DISTRIBUTED_DP_STEP: SecureSumTask(distributed_dp_contribution, integer_vector=True),
    SiteTask.FEDERATED_EVAL: SecureSumTask(
        federated_eval_contribution,
        integer_vector=True,
        result_length=EvaluationCounts.length(),
    ),
}


def plain_task(task: SiteTask) -> PlainTask | SiteRefusal:
    """What the site runs for ``task`` in the clear, or its refusal: a result meant only
    for a secure sum never goes out alone."""
    if task in PLAIN_TASKS:
        return PLAIN_TASKS[task]
    return SiteRefusal(
        RefusalCode.PRIVACY_POLICY,
        f"task {task.value} is computed only inside a secure sum: its result alone would "
        "reveal more than this site's policy allows",
    )


def secure_sum_task(task: SiteTask) -> SecureSumTask | SiteRefusal:
    """What the site runs for ``task`` at the setup of a SecAgg+ round, or its refusal."""
    if task in SECURE_SUM_TASKS:
        return SECURE_SUM_TASKS[task]
    return SiteRefusal(RefusalCode.BAD_REQUEST, f"task {task.value} has no secure-sum form here")
