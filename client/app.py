"""The site's ClientApp: Flower messages in, plain function calls out.

Heavy modules (torch, opacus) are imported inside the training handlers, not at import time:
deployment starts a fresh ClientApp process per message, and the SecAgg+ stages after setup
import no torch at all.

Two ways to take part in a round:

- ``train``: plain FedAvg; the reply carries the update and the metrics.
- SecAgg+ (Bell et al., CCS 2020; Bonawitz et al., CCS 2017), four custom actions
  (``common.secure_round``): ``secagg_setup`` trains and advertises keys, ``secagg_share``,
  ``secagg_masked`` and ``secagg_unmask`` call ``client.secagg.stages``. The trained update
  waits in a node-private file (``client.secagg.pending_update``), never in
  ``context.state``; the protocol state there is small and tagged with round and stage, so a
  late or replayed message is refused with a reason instead of crashing the handler.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.privacy_ledger import LEDGER_KEY, PrivacyLedger, ledger_file_session
from client.privacy_policy import SitePrivacyPolicy
from client.reply_padding import pad_training_replies
from client.secagg.aggregation_floor import TooFewSites
from client.secagg.pending_update import (
    PendingUpdate,
    discard_pending_updates,
    load_pending_update,
    node_spill_dir,
    save_pending_update,
)
from client.secagg.policy import ClientSecAggPolicy, SecAggPolicyError
from client.secagg.refusal import SecAggRefusal
from client.secagg.stages import (
    ClientSecAggState,
    client_masked_input,
    client_setup,
    client_share_keys,
    client_state_from_record,
    client_state_to_record,
    client_unmask,
)
from common.secagg.protocol_stages import STAGE_MASKED_INPUT, STAGE_SHARE_KEYS, require_tag
from common.secure_round import (
    ACTION_MASKED,
    ACTION_SETUP,
    ACTION_SHARE,
    ACTION_UNMASK,
    METRIC_EPSILON_BOUND,
    METRIC_NUM_EXAMPLES,
    METRIC_STEPS,
    RECORD_MASKED,
    RECORD_PRIVACY,
    RECORD_SECAGG,
    RECORD_STATUS,
    flatten_update,
    reported_epsilon,
    weighted_metrics,
)
from common.site_refusal import RefusalCode, SiteRefusal, status_payload
from common.train_request import TrainRequest

if TYPE_CHECKING:  # torch: imported only by the handlers that train
    from client.training_round import RoundOutcome

logger = logging.getLogger(__name__)
LEDGER_DIR_ENV = "FEDMM_LEDGER_DIR"

#: Every training reply is padded to the site policy's ``min-reply-seconds``.
app = ClientApp(mods=[pad_training_replies])


def _ledger_file(context: Context) -> Path | None:
    """Where the ledger outlives the run: node config ``ledger-file``, or in simulation
    ``$FEDMM_LEDGER_DIR/site-<partition-id>.json``."""
    if "ledger-file" in context.node_config:
        return Path(str(context.node_config["ledger-file"]))
    directory = os.environ.get(LEDGER_DIR_ENV)
    if directory and "partition-id" in context.node_config:
        return Path(directory) / f"site-{context.node_config['partition-id']}.json"
    return None


@contextlib.contextmanager
def _ledger_session(context: Context) -> Iterator[PrivacyLedger]:
    """The site's ledger for one training message, saved when the block changed it: from
    its file (locked from load to save, so two handler processes never spend one state), or
    from this run's node state when the site names no ledger file."""
    path = _ledger_file(context)
    if path is not None:
        with ledger_file_session(path) as ledger:
            before = copy.deepcopy(ledger)
            yield ledger
            if ledger != before:
                ledger.save(path)
                context.state.config_records[LEDGER_KEY] = ledger.to_record()
        return
    record = context.state.config_records.get(LEDGER_KEY)
    ledger = PrivacyLedger() if record is None else PrivacyLedger.from_record(record)
    before = copy.deepcopy(ledger)
    yield ledger
    if ledger != before:
        context.state.config_records[LEDGER_KEY] = ledger.to_record()


def _train_at_site(request: TrainRequest, arrays: ArrayRecord, context: Context) -> RoundOutcome:
    """The site's data, policy and ledger, then ``run_training_round``; the ledger is saved
    when it changed (the site trained, or drew its noisy count). torch is imported here only
    (deployment: a process a message)."""
    import torch

    from client.site_data import load_site_data
    from client.training_round import run_training_round

    torch.set_num_threads(int(os.environ.get("FEDMM_TORCH_THREADS", "1")))
    with _ledger_session(context) as ledger:
        outcome = run_training_round(
            global_state=arrays.to_torch_state_dict(),
            request=request,
            data=load_site_data(context.node_config, request),
            policy=SitePrivacyPolicy.for_site(context.node_config),
            ledger=ledger,
            run_id=context.run_id,
            persistent_ledger=_ledger_file(context) is not None,
        )
    if outcome.update is None:
        logger.warning("site refuses round %s: %s", request.server_round, outcome.refusal)
    return outcome


@app.train()
def train(msg: Message, context: Context) -> Message:
    request = TrainRequest.from_config(dict(msg.content.config_records["config"]))
    outcome = _train_at_site(request, msg.content.array_records["arrays"], context)
    if outcome.update is None:
        refusal = outcome.refusal or SiteRefusal(RefusalCode.BAD_REQUEST)
        return Message(RecordDict({"status": ConfigRecord(status_payload(refusal))}), reply_to=msg)
    content = RecordDict(
        {
            "update": ArrayRecord(outcome.update),
            "metrics": MetricRecord(outcome.metrics),
            "status": ConfigRecord(status_payload(None)),
        }
    )
    return Message(content, reply_to=msg)


# --- SecAgg+ -------------------------------------------------------------------------------

SECAGG_STATE_KEY = "secagg"  # this round's protocol state (keys, shares; small)
SECAGG_LAST_ROUND_KEY = "secagg-last-round"  # the last round this site took part in
SECAGG_SPILL_KEY = "secagg-spill"  # this node's private directory for waiting updates


@dataclass(frozen=True)
class LocalUpdate:
    """What local training hands to secure aggregation."""

    update: np.ndarray  # flat, in the global arrays' order
    num_examples: int  # the site's public (noisy) record count
    steps: int
    epsilon_bound: float  # the bound the site commits to, not its exact spend
    #: Distributed DP: the honest sites whose noise shares this site assumes in every sum
    #: (h); the site then refuses to go on with fewer (``client.secagg.aggregation_floor``).
    honest_sites: int = 0


#: A trainer: (train request, setup message, context) -> the update, or a refusal.
Trainer = Callable[[TrainRequest, Message, Context], "LocalUpdate | SiteRefusal"]


def train_with_dp(
    request: TrainRequest, msg: Message, context: Context
) -> LocalUpdate | SiteRefusal:
    """DP-SGD on the site's data (``client.training_round``); torch is imported here only."""
    arrays = msg.content.array_records["arrays"]
    outcome = _train_at_site(request, arrays, context)
    if outcome.update is None:
        return outcome.refusal or SiteRefusal(RefusalCode.BAD_REQUEST)
    keys = list(arrays.keys())
    return LocalUpdate(
        update=flatten_update({k: v.numpy() for k, v in outcome.update.items()}, keys),
        num_examples=int(outcome.metrics[METRIC_NUM_EXAMPLES]),
        steps=int(outcome.metrics[METRIC_STEPS]),
        epsilon_bound=float(outcome.metrics[METRIC_EPSILON_BOUND]),
    )


@app.train(ACTION_SETUP)
def secagg_setup(msg: Message, context: Context) -> Message:
    config = msg.content.config_records.get("config")
    distributed = config is not None and "ddp-sample-rate" in config
    return run_secagg_setup(
        msg,
        context,
        train=train_distributed_dp if distributed else train_with_dp,
        integer_update=distributed,
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
    with _ledger_session(context) as ledger:
        outcome = run_distributed_dp_step(
            global_state=arrays.to_torch_state_dict(),
            request=request,
            plan=plan,
            data=load_site_data(context.node_config, request),
            policy=SitePrivacyPolicy.for_site(context.node_config),
            ledger=ledger,
            bit_width=bit_width,
            run_id=context.run_id,
            persistent_ledger=_ledger_file(context) is not None,
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


@app.train(ACTION_SHARE)
def secagg_share(msg: Message, context: Context) -> Message:
    try:
        state, request = _stage_input(msg, context)
        state, reply = client_share_keys(state=state, request=request)
    except (ValueError, KeyError) as refusal:
        return _refuse(msg, _as_refusal(refusal))
    _store_state(context, state)
    return _secagg_reply(msg, reply)


@app.train(ACTION_MASKED)
def secagg_masked(msg: Message, context: Context) -> Message:
    try:
        state, request = _stage_input(msg, context)
        if state.stage != STAGE_SHARE_KEYS:
            raise SecAggRefusal(
                f"masked-input request out of order (last stage {state.stage!r})",
                code=RefusalCode.OUT_OF_ORDER,
            )
        require_tag(request, round_id=state.config.round_id, stage=STAGE_MASKED_INPUT)
        record = context.state.config_records[SECAGG_STATE_KEY]
        pending = load_pending_update(
            Path(str(record["pending-file"])), round_id=state.config.round_id
        )
        state, reply = client_masked_input(
            state=state,
            request=request,
            update=pending.update,
            weight=pending.weight,
            metrics=pending.metrics,
        )
    except (ValueError, KeyError) as refusal:  # refusals, stale state, unusable local input
        return _refuse(msg, _as_refusal(refusal))
    # Masked: the plain update is no longer needed, nor (when empty) its directory.
    pending_file = Path(str(record["pending-file"]))
    pending_file.unlink(missing_ok=True)
    _release_spill_dir(context, pending_file.parent)
    _store_state(context, state)
    masked = reply.pop("masked_input")
    out = _secagg_reply(msg, reply)
    out.content.array_records[RECORD_MASKED] = ArrayRecord([masked])
    return out


@app.train(ACTION_UNMASK)
def secagg_unmask(msg: Message, context: Context) -> Message:
    try:
        state, request = _stage_input(msg, context)
        _state, reply = client_unmask(state=state, request=request)
    except TooFewSites as refusal:  # below this site's minimum: the round is dead here
        context.state.config_records.pop(SECAGG_STATE_KEY, None)
        return _refuse(msg, refusal.refusal())
    except (ValueError, KeyError) as refusal:
        return _refuse(msg, _as_refusal(refusal))
    # Unmasking runs once per round: drop the state (and its secrets) now, so a second
    # request for the other secret of a site finds nothing to answer from.
    del context.state.config_records[SECAGG_STATE_KEY]
    return _secagg_reply(msg, reply)


def run_secagg_setup(
    msg: Message, context: Context, *, train: Trainer, integer_update: bool | None = None
) -> Message:
    """Check the round config, train with ``train``, keep the update waiting, advertise keys.

    Everything that can be checked before training is: the round config against the site's
    policy, the update length against the global arrays, and (``integer_update``, when
    given) the kind of update the round expects; a bad request costs no privacy budget. The
    round is marked as this site's last before training, so a replayed setup never trains
    twice.
    """
    try:
        payload = dict(msg.content.config_records[RECORD_SECAGG])
        request = TrainRequest.from_config(dict(msg.content.config_records["config"]))
        arrays = msg.content.array_records["arrays"]
        global_length = sum(math.prod(arrays[key].shape) for key in arrays)
    except (KeyError, TypeError, ValueError) as error:
        return _refuse(msg, SiteRefusal(RefusalCode.BAD_REQUEST, f"setup request: {error}"))
    last = context.state.config_records.get(SECAGG_LAST_ROUND_KEY)
    try:
        policy = _secagg_policy(context.node_config)
    except SecAggPolicyError as error:  # the site's own configuration: fix it, then rejoin
        return _refuse(msg, SiteRefusal(RefusalCode.SECAGG_POLICY, str(error)))
    try:
        if payload.get("round") != request.server_round:
            raise SecAggRefusal("setup request: secagg round differs from the training round")
        state, reply = client_setup(
            site_id=context.node_id,
            request=payload,
            policy=policy,
            previous_round=None if last is None else int(last["round"]),
        )
        if state.config.update_length != global_length:
            raise SecAggRefusal(
                f"setup request: update length {state.config.update_length} differs from the "
                f"{global_length} entries of the global model"
            )
        if integer_update is not None and state.config.integer_update != integer_update:
            raise SecAggRefusal(
                "setup request: integer (distributed-DP) and real updates do not mix: the "
                "round config and the train request differ"
            )
    except SecAggRefusal as refusal:
        return _refuse(msg, refusal.refusal())
    config = state.config
    # From here on this round is taken: a replay of this setup is refused, trained or not.
    context.state.config_records[SECAGG_LAST_ROUND_KEY] = ConfigRecord({"round": config.round_id})
    spill = context.state.config_records.get(SECAGG_SPILL_KEY)
    directory = node_spill_dir(
        existing=None if spill is None else str(spill["dir"]),
        base=str(context.node_config.get("secagg-spill-dir", "")) or None,
    )
    context.state.config_records[SECAGG_SPILL_KEY] = ConfigRecord({"dir": str(directory)})
    # A new round: whatever an earlier round left behind is stale.
    context.state.config_records.pop(SECAGG_STATE_KEY, None)
    discard_pending_updates(directory)
    trained = train(request, msg, context)
    if isinstance(trained, SiteRefusal) or trained.update.shape != (config.update_length,):
        _release_spill_dir(context, directory)
        refusal = (
            trained
            if isinstance(trained, SiteRefusal)
            else SiteRefusal(
                RefusalCode.BAD_REQUEST,
                "the trained update does not match the round's update length",
            )
        )
        return _refuse(msg, refusal)
    weight = min(int(trained.num_examples), config.max_weight)
    if weight < trained.num_examples:
        logger.warning("weight capped at secagg max weight %d", config.max_weight)
    if config.integer_update != np.issubdtype(trained.update.dtype, np.unsignedinteger):
        _release_spill_dir(context, directory)
        return _refuse(
            msg,
            SiteRefusal(
                RefusalCode.BAD_REQUEST,
                "integer (distributed-DP) and real updates do not mix: round config differs",
            ),
        )
    if trained.honest_sites:  # distributed DP: h joins this site's floor for the round
        state = dataclasses.replace(state, honest_sites=int(trained.honest_sites))
    clipped = 0
    if not config.integer_update:
        clipped = int(np.count_nonzero(np.abs(trained.update) > config.update_clip))
    if clipped:
        logger.warning(
            "%d of %d update entries exceed the secagg clip %g and are clipped",
            clipped,
            config.update_length,
            config.update_clip,
        )
    path = save_pending_update(
        directory,
        PendingUpdate(
            round_id=config.round_id,
            update=trained.update,
            weight=weight,
            metrics=weighted_metrics(weight=weight, steps=trained.steps),
        ),
    )
    _store_state(context, state, pending_file=str(path))
    out = _secagg_reply(msg, reply)
    out.content.metric_records[RECORD_PRIVACY] = MetricRecord(
        {"epsilon": reported_epsilon(trained.epsilon_bound)}
    )
    return out


def _release_spill_dir(context: Context, directory: Path) -> None:
    """Remove the node's spill directory once it is empty (nothing waits in it)."""
    with contextlib.suppress(OSError):
        directory.rmdir()
        context.state.config_records.pop(SECAGG_SPILL_KEY, None)


def _secagg_policy(node_config: Any) -> ClientSecAggPolicy:
    """The site's own secure-aggregation policy (``client.secagg.policy``: its policy file's
    ``[secure-aggregation]`` table and node config ``secagg-*``)."""
    return ClientSecAggPolicy.for_site(node_config)


def _stage_input(msg: Message, context: Context) -> tuple[ClientSecAggState, dict[str, Any]]:
    """This round's state and the request; a refusal when either is missing."""
    record = context.state.config_records.get(SECAGG_STATE_KEY)
    if record is None:
        raise SecAggRefusal(
            "no secure-aggregation round in progress (late or replayed message)",
            code=RefusalCode.OUT_OF_ORDER,
        )
    if RECORD_SECAGG not in msg.content.config_records:
        raise SecAggRefusal("request has no secagg record")
    return client_state_from_record(dict(record)), dict(msg.content.config_records[RECORD_SECAGG])


def _store_state(context: Context, state: ClientSecAggState, *, pending_file: str = "") -> None:
    previous = context.state.config_records.get(SECAGG_STATE_KEY)
    if not pending_file and previous is not None:
        pending_file = str(previous.get("pending-file", ""))
    context.state.config_records[SECAGG_STATE_KEY] = ConfigRecord(
        client_state_to_record(state) | {"pending-file": pending_file}
    )


def _secagg_reply(msg: Message, payload: dict[str, Any]) -> Message:
    return Message(
        RecordDict(
            {
                RECORD_SECAGG: ConfigRecord(payload),
                RECORD_STATUS: ConfigRecord(status_payload(None)),
            }
        ),
        reply_to=msg,
    )


def _as_refusal(error: Exception) -> SiteRefusal:
    """A stage's exception as a refusal: a ``SecAggRefusal`` keeps its code; anything else
    (stale state, unusable local input) is a bad request."""
    if isinstance(error, SecAggRefusal):
        return error.refusal()
    return SiteRefusal(RefusalCode.BAD_REQUEST, f"{type(error).__name__}: {error}")


def _refuse(msg: Message, refusal: SiteRefusal) -> Message:
    """The reply to a refused request: only the code goes out, the detail is logged here."""
    logger.warning("site refuses %s: %s", msg.metadata.message_type, refusal)
    status = ConfigRecord(status_payload(refusal))
    return Message(RecordDict({RECORD_STATUS: status}), reply_to=msg)
