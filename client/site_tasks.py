"""What a site computes when asked to train: DP-SGD at the site, or one distributed-DP step.

Each reads the site's data, policy and ledger (``client.ledger_session``), then calls a plain
function (``client.training_round``, ``client.distributed_dp_step``). torch and opacus are
imported inside these functions only: deployment starts a fresh ClientApp process per
message, and only the training message needs them.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING

from flwr.app import ArrayRecord, Context, Message

from client.ledger_session import ledger_file, ledger_session
from client.privacy_policy import SitePrivacyPolicy
from client.secure_aggregation import LocalUpdate
from common.secure_round import (
    METRIC_EPSILON_BOUND,
    METRIC_NUM_EXAMPLES,
    METRIC_STEPS,
    RECORD_SECAGG,
    flatten_update,
)
from common.site_refusal import RefusalCode, SiteRefusal
from common.train_request import TrainRequest

if TYPE_CHECKING:  # torch: imported only by the functions that train
    from client.training_round import RoundOutcome

logger = logging.getLogger(__name__)


def train_at_site(request: TrainRequest, arrays: ArrayRecord, context: Context) -> RoundOutcome:
    """The site's data, policy and ledger, then ``run_training_round``; the ledger is saved
    when it changed (the site trained, or drew its noisy count). torch is imported here only
    (deployment: a process a message)."""
    import torch

    from client.site_data import load_site_data
    from client.training_round import run_training_round

    torch.set_num_threads(int(os.environ.get("FEDMM_TORCH_THREADS", "1")))
    with ledger_session(context) as ledger:
        outcome = run_training_round(
            global_state=arrays.to_torch_state_dict(),
            request=request,
            data=load_site_data(context.node_config, request),
            policy=SitePrivacyPolicy.for_site(context.node_config),
            ledger=ledger,
            run_id=context.run_id,
            persistent_ledger=ledger_file(context) is not None,
        )
    if outcome.update is None:
        logger.warning("site refuses round %s: %s", request.server_round, outcome.refusal)
    return outcome


def train_with_dp(
    request: TrainRequest, msg: Message, context: Context
) -> LocalUpdate | SiteRefusal:
    """DP-SGD on the site's data (``client.training_round``); torch is imported here only."""
    arrays = msg.content.array_records["arrays"]
    outcome = train_at_site(request, arrays, context)
    if outcome.update is None:
        return outcome.refusal or SiteRefusal(RefusalCode.BAD_REQUEST)
    keys = list(arrays.keys())
    return LocalUpdate(
        update=flatten_update({k: v.numpy() for k, v in outcome.update.items()}, keys),
        num_examples=int(outcome.metrics[METRIC_NUM_EXAMPLES]),
        steps=int(outcome.metrics[METRIC_STEPS]),
        epsilon_bound=float(outcome.metrics[METRIC_EPSILON_BOUND]),
    )


def train_distributed_dp(
    request: TrainRequest, msg: Message, context: Context
) -> LocalUpdate | SiteRefusal:
    """One distributed-DP step (``client.distributed_dp_step``): the integer gradient sum
    plus this site's Skellam share, in Z_(2^b); torch is imported here only."""
    import torch

    from client.distributed_dp_step import run_distributed_dp_step
    from client.site_data import load_site_data
    from common.distributed_dp.plan import DistributedDPPlan

    torch.set_num_threads(int(os.environ.get("FEDMM_TORCH_THREADS", "1")))
    try:
        plan = DistributedDPPlan.from_config(dict(msg.content.config_records["config"]))
        bit_width = int(msg.content.config_records[RECORD_SECAGG]["bit_width"])
    except (KeyError, TypeError, ValueError) as error:
        return SiteRefusal(RefusalCode.BAD_REQUEST, f"distributed-DP request rejected: {error}")
    if plan is None:
        return SiteRefusal(RefusalCode.BAD_REQUEST, "distributed-DP request has no plan")
    arrays = msg.content.array_records["arrays"]
    with ledger_session(context) as ledger:
        outcome = run_distributed_dp_step(
            global_state=arrays.to_torch_state_dict(),
            request=request,
            plan=plan,
            data=load_site_data(context.node_config, request),
            policy=SitePrivacyPolicy.for_site(context.node_config),
            ledger=ledger,
            bit_width=bit_width,
            run_id=context.run_id,
            persistent_ledger=ledger_file(context) is not None,
        )
    if outcome.integers is None:
        return outcome.refusal or SiteRefusal(RefusalCode.BAD_REQUEST)
    return LocalUpdate(
        update=outcome.integers,
        num_examples=outcome.num_records,
        steps=1,
        epsilon_bound=outcome.epsilon_bound,
        honest_sites=outcome.honest_sites,
    )
