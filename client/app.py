"""The site's ClientApp: Flower messages in, plain function calls out.

A message's type picks the exchange (Flower routes it to a handler here); the task its
request declares (field ``task`` of record ``config``, ``common.site_task``) picks what the
site computes in it (``client.site_tasks``), and the site's own policy still decides
whether it does:

- ``train``: plain FedAvg; the task's result (an update) goes back in the clear. A task whose
  result is meant only for a secure sum is refused here.
- ``train.secagg_setup``: the first of SecAgg+'s four exchanges (Bell et al., CCS 2020;
  Bonawitz et al., CCS 2017): the task's result is masked; ``train.secagg_share``,
  ``train.secagg_masked`` and ``train.secagg_unmask`` complete the sum
  (``client.secure_aggregation``); in active-coordinator mode ``train.secagg_consistency``
  (the signed survivor set) runs before unmask. ``train.secagg_setup_share`` is setup and
  share keys in one exchange, with the keys the site advertised in its last unmask reply
  (three exchanges a round).
- ``evaluate`` and ``evaluate.secagg_*``: the same two ways for an evaluation task
  (``federated_eval``: counts on the site's held-out records, which the site computes only
  inside a secure sum, so a plain ``evaluate`` request for it is refused).

Heavy modules (torch, opacus) are imported inside the tasks that train, not at import
time: a deployed site may start a fresh runner for a message (its warm runner restarted, or
``warm=False``), and the SecAgg+ stages after setup import no torch at all.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import Mod

from fedmm.client.reply_padding import pad_training_replies
from fedmm.client.secure_aggregation import (
    plain_round_refusal,
    run_secagg_setup,
    run_secagg_setup_share,
    secagg_consistency,
    secagg_masked,
    secagg_share,
    secagg_unmask,
)
from fedmm.client.site_audit import audit_site_replies
from fedmm.client.site_replies import refuse
from fedmm.client.site_tasks import plain_task, secure_sum_task
from fedmm.common.secure_round import (
    ACTION_CONSISTENCY,
    ACTION_MASKED,
    ACTION_SETUP,
    ACTION_SETUP_SHARE,
    ACTION_SHARE,
    ACTION_UNMASK,
)
from fedmm.common.site_refusal import RECORD_STATUS, RefusalCode, SiteRefusal, status_payload
from fedmm.common.site_task import (
    RECORD_CONFIG,
    RECORD_METRICS,
    RECORD_UPDATE,
    SiteTask,
    TaskError,
    declared_task,
    exchange_kind,
)


def build_client_app(*, mods: Sequence[Mod] = ()) -> ClientApp:
    """The site's ClientApp. ``mods`` run first, around every handler (the local simulation
    fills each simulated site's node config with one); then every training reply is padded
    to the site policy's ``min-reply-seconds`` (``client.reply_padding``), and every refusal
    goes into the site's audit log (``client.site_audit``)."""
    client_app = ClientApp(mods=[*mods, pad_training_replies, audit_site_replies])
    client_app.train()(train)
    client_app.train(ACTION_SETUP)(secagg_setup)
    client_app.train(ACTION_SETUP_SHARE)(secagg_setup_share)
    client_app.train(ACTION_SHARE)(secagg_share)
    client_app.train(ACTION_MASKED)(secagg_masked)
    client_app.train(ACTION_CONSISTENCY)(secagg_consistency)
    client_app.train(ACTION_UNMASK)(secagg_unmask)
    # Federated evaluation: the same exchanges, as messages of type evaluate(.*).
    client_app.evaluate()(evaluate)
    client_app.evaluate(ACTION_SETUP)(secagg_setup)
    client_app.evaluate(ACTION_SETUP_SHARE)(secagg_setup_share)
    client_app.evaluate(ACTION_SHARE)(secagg_share)
    client_app.evaluate(ACTION_MASKED)(secagg_masked)
    client_app.evaluate(ACTION_CONSISTENCY)(secagg_consistency)
    client_app.evaluate(ACTION_UNMASK)(secagg_unmask)
    return client_app


def _task(msg: Message) -> SiteTask | SiteRefusal:
    """The declared task, refused when it does not belong to the message's exchange (an
    evaluation task in a ``train`` message, or training in an ``evaluate`` one)."""
    try:
        task = declared_task(msg.content.config_records.get(RECORD_CONFIG))
    except TaskError as error:
        return SiteRefusal(RefusalCode.BAD_REQUEST, str(error))
    kind = msg.metadata.message_type.split(".")[0]
    if exchange_kind(task) != kind:
        return SiteRefusal(
            RefusalCode.BAD_REQUEST, f"task {task.value} does not run in a {kind} message"
        )
    return task


def train(msg: Message, context: Context) -> Message:
    """Plain FedAvg: the declared task's update and metrics, in the clear (refused by a site
    that demands active-coordinator mode)."""
    demanded = plain_round_refusal(context)
    if demanded is not None:
        return refuse(msg, demanded)
    task = _task(msg)
    run = task if isinstance(task, SiteRefusal) else plain_task(task)
    if isinstance(run, SiteRefusal):
        return refuse(msg, run)
    outcome = run(msg, context)
    if isinstance(outcome, SiteRefusal):
        return refuse(msg, outcome)
    content = RecordDict(
        {
            RECORD_UPDATE: ArrayRecord(outcome.update),
            RECORD_METRICS: MetricRecord(outcome.metrics),
            RECORD_STATUS: ConfigRecord(status_payload(None)),
        }
    )
    return Message(content, reply_to=msg)


def evaluate(msg: Message, context: Context) -> Message:
    """A plain ``evaluate`` request: no evaluation task has a form in the clear (its counts
    leave a site only inside a secure sum), so the site refuses with the task's code."""
    task = _task(msg)
    run = task if isinstance(task, SiteRefusal) else plain_task(task)
    if isinstance(run, SiteRefusal):
        return refuse(msg, run)
    return refuse(msg, SiteRefusal(RefusalCode.BAD_REQUEST, "no plain evaluation task"))


def secagg_setup(msg: Message, context: Context) -> Message:
    """SecAgg+ setup: the declared task's result, masked later; the site's keys now."""
    return _secure_task_exchange(msg, context, run_secagg_setup)


def secagg_setup_share(msg: Message, context: Context) -> Message:
    """SecAgg+ setup and share keys in one exchange, with the keys the site advertised for
    the round: the declared task's result, masked later; the sealed shares now."""
    return _secure_task_exchange(msg, context, run_secagg_setup_share)


def _secure_task_exchange(msg: Message, context: Context, run: Callable[..., Message]) -> Message:
    task = _task(msg)
    secure = task if isinstance(task, SiteRefusal) else secure_sum_task(task)
    if isinstance(secure, SiteRefusal):
        return refuse(msg, secure)
    return run(
        msg,
        context,
        contribute=secure.contribute,
        integer_vector=secure.integer_vector,
        result_length=secure.result_length,
    )


app = build_client_app()
