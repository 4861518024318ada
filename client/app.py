"""The site's ClientApp: Flower messages in, plain function calls out.

Heavy modules (torch, opacus) are imported inside the handler, not at import time:
deployment starts a fresh ClientApp process per message.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.privacy_ledger import LEDGER_KEY, PrivacyLedger
from client.privacy_policy import SitePrivacyPolicy
from common.train_request import TrainRequest

logger = logging.getLogger(__name__)
LEDGER_DIR_ENV = "FEDMM_LEDGER_DIR"

app = ClientApp()


def _ledger_file(context: Context) -> Path | None:
    """Where the ledger outlives the run: node config ``ledger-file``, or in simulation
    ``$FEDMM_LEDGER_DIR/site-<partition-id>.json``."""
    if "ledger-file" in context.node_config:
        return Path(str(context.node_config["ledger-file"]))
    directory = os.environ.get(LEDGER_DIR_ENV)
    if directory and "partition-id" in context.node_config:
        return Path(directory) / f"site-{context.node_config['partition-id']}.json"
    return None


def _load_ledger(context: Context) -> PrivacyLedger:
    path = _ledger_file(context)
    if path is not None:
        return PrivacyLedger.load(path)
    if LEDGER_KEY in context.state.config_records:
        return PrivacyLedger.from_record(context.state.config_records[LEDGER_KEY])
    return PrivacyLedger()


def _save_ledger(context: Context, ledger: PrivacyLedger) -> None:
    context.state.config_records[LEDGER_KEY] = ledger.to_record()
    path = _ledger_file(context)
    if path is not None:
        ledger.save(path)


@app.train()
def train(msg: Message, context: Context) -> Message:
    import torch

    from client.site_data import load_site_data
    from client.training_round import run_training_round

    torch.set_num_threads(int(os.environ.get("FEDMM_TORCH_THREADS", "1")))
    request = TrainRequest.from_config(dict(msg.content.config_records["config"]))
    policy = SitePrivacyPolicy.for_site(context.node_config)
    data = load_site_data(context.node_config, request)
    ledger = _load_ledger(context)
    global_state = msg.content.array_records["arrays"].to_torch_state_dict()
    outcome = run_training_round(
        global_state=global_state, request=request, data=data, policy=policy, ledger=ledger
    )
    if outcome.update is None:
        logger.warning("site refuses round %s: %s", request.server_round, outcome.refusal)
        status = ConfigRecord({"refused": True, "reason": outcome.refusal or ""})
        return Message(RecordDict({"status": status}), reply_to=msg)
    _save_ledger(context, ledger)
    content = RecordDict(
        {
            "update": ArrayRecord(outcome.update),
            "metrics": MetricRecord(outcome.metrics),
            "status": ConfigRecord({"refused": False, "reason": ""}),
        }
    )
    return Message(content, reply_to=msg)
