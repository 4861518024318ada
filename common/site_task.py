"""What a request asks a site to compute: the ``task`` it declares, and the records it carries.

The first message of a round to a site carries the global model (record ``arrays``) and a
ConfigRecord ``config`` whose field ``task`` declares what the site computes; the site picks
its handler from that field, never from which other keys happen to be present. The message
type says how the result travels: ``train`` (plain FedAvg: the result goes back in the
clear) or ``train.secagg_setup`` (into a SecAgg+ sum: ``common.secure_round``); an
evaluation task travels the same way in messages of type ``evaluate.*``. A site
refuses a task it does not know, and a task its own policy forbids in that exchange,
whatever the request declares (``client.site_tasks``).

Wire keys, the names of the records in a message and of the fields in them, both ways, are
snake_case: they are the field names of what they carry (``TrainRequest``,
``DistributedDPPlan``, the SecAgg+ payloads). What a person writes (run config, node config,
policy files) is kebab-case, Flower's convention for user config.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum
from typing import Any


class SiteTask(StrEnum):
    """What a site computes for a request."""

    #: DP-SGD on the site's records under its own policy and ledger: the model update.
    LOCAL_DP_SGD = "local_dp_sgd"
    #: One DP-SGD step of distributed DP: the site's integer gradient sum plus its Skellam
    #: noise share, only ever inside a SecAgg+ sum (``client.distributed_dp_step``).
    DISTRIBUTED_DP_STEP = "distributed_dp_step"
    #: Federated evaluation: retrieval counts of the global model on the site's held-out
    #: records, only ever inside a SecAgg+ sum (``common.federated_eval``).
    FEDERATED_EVAL = "federated_eval"


#: The tasks that evaluate (sent in ``evaluate`` messages; the others in ``train`` messages).
EVALUATION_TASKS = frozenset({SiteTask.FEDERATED_EVAL})


def exchange_kind(task: SiteTask) -> str:
    """The Flower message type a request for ``task`` travels in: ``evaluate`` or ``train``
    (SecAgg+'s stages append their action: ``evaluate.secagg_setup``)."""
    return "evaluate" if task in EVALUATION_TASKS else "train"


#: The field of the ``config`` record that declares the task.
TASK_FIELD = "task"
#: Records of a request: the global model, the request's config, distributed DP's plan.
RECORD_ARRAYS = "arrays"
RECORD_CONFIG = "config"
RECORD_PLAN = "plan"
#: Records of a plain (FedAvg) reply: the site's update and its metrics.
RECORD_UPDATE = "update"
RECORD_METRICS = "metrics"


class TaskError(ValueError):
    """A request declares no task, or one this code does not know; the message says which."""


def declared_task(config: Mapping[str, Any] | None) -> SiteTask:
    """The task a request's ``config`` record declares."""
    if config is None:
        raise TaskError(f"the request has no {RECORD_CONFIG!r} record")
    value = config.get(TASK_FIELD)
    if value is None:
        raise TaskError(f"the request declares no task (field {TASK_FIELD!r} of {RECORD_CONFIG!r})")
    try:
        return SiteTask(value)
    except ValueError:
        known = ", ".join(task.value for task in SiteTask)
        raise TaskError(f"unknown task {str(value)[:40]!r}; known: {known}") from None


def task_config(task: SiteTask, fields: Mapping[str, Any]) -> dict[str, Any]:
    """A request's ``config`` record: the declared task and the request's fields."""
    if TASK_FIELD in fields:
        raise ValueError(f"the request's fields may not hold {TASK_FIELD!r}")
    return {TASK_FIELD: task.value, **fields}
