"""The site's ClientApp: Flower messages in, plain function calls out.

Heavy modules (torch, opacus) are imported inside the training functions
(``client.site_tasks``), not at import time: deployment starts a fresh ClientApp process per
message, and the SecAgg+ stages after setup import no torch at all.

Two ways to take part in a round:

- ``train``: plain FedAvg; the reply carries the update and the metrics.
- SecAgg+ (Bell et al., CCS 2020; Bonawitz et al., CCS 2017), four custom actions
  (``common.secure_round``) whose glue is ``client.secure_aggregation``.
"""

from __future__ import annotations

import logging

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.reply_padding import pad_training_replies
from client.secure_aggregation import (
    run_secagg_setup,
    secagg_masked,
    secagg_share,
    secagg_unmask,
)
from client.site_tasks import train_at_site, train_distributed_dp, train_with_dp
from common.secure_round import ACTION_MASKED, ACTION_SETUP, ACTION_SHARE, ACTION_UNMASK
from common.site_refusal import RefusalCode, SiteRefusal, status_payload
from common.train_request import TrainRequest

logger = logging.getLogger(__name__)

#: Every training reply is padded to the site policy's ``min-reply-seconds``.
app = ClientApp(mods=[pad_training_replies])


@app.train()
def train(msg: Message, context: Context) -> Message:
    request = TrainRequest.from_config(dict(msg.content.config_records["config"]))
    outcome = train_at_site(request, msg.content.array_records["arrays"], context)
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


app.train(ACTION_SHARE)(secagg_share)
app.train(ACTION_MASKED)(secagg_masked)
app.train(ACTION_UNMASK)(secagg_unmask)
