"""A Grid that delivers each message to a site's handler in this process, for wiring tests.

One Context per node, as a SuperNode keeps it; every message sent and every reply is
recorded, and ``fault`` can drop a message or turn it into an error reply (a dropout).
``rewrite`` changes a request's ``secagg`` payload (and ``secagg_share``'s, in a
setup-and-share request) on its way to a site: a malicious
coordinator deviating from the real coordinator's stages. ``node_handlers`` replace the
handler of single nodes (a node the coordinator runs itself). The
handlers are the site's real ones: the ClientApp itself (``app``: Flower's routing, mods and
handlers), or the SecAgg+ stage handlers of ``client.secure_aggregation`` (in ``train.*``
and ``evaluate.*`` messages) with a test's own ``contribute`` at setup instead of DP-SGD. No
torch is imported here.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any
from uuid import uuid4

from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, RecordDict

from fedmm.client import secure_aggregation
from fedmm.common.federation_config import FederationConfig
from fedmm.common.secure_round import (
    MESSAGE_CONSISTENCY,
    MESSAGE_MASKED,
    MESSAGE_SETUP,
    MESSAGE_SETUP_SHARE,
    MESSAGE_SHARE,
    MESSAGE_UNMASK,
    metric_ranges,
)
from fedmm.common.site_task import RECORD_ARRAYS, RECORD_CONFIG, SiteTask, task_config
from fedmm.common.train_request import TrainRequest
from fedmm.server.aggregation import RoundRequest

Handler = Callable[[Message, Context], Message]
Fault = Callable[[str, int], str | None]  # (message type, node) -> "drop" | "error" | None
Rewrite = Callable[[str, int, dict[str, Any]], dict[str, Any]]  # (type, node, payload)


class InProcessGrid:
    """Delivers each message to its node's handler; records what was sent and received."""

    def __init__(
        self,
        node_ids: Sequence[int],
        *,
        contribute: secure_aggregation.Contributor | None = None,
        integer_vector: bool = False,
        result_length: int | None = None,
        app: Handler | None = None,
        node_config: Mapping[str, Any] | None = None,
        node_configs: Mapping[int, Mapping[str, Any]] | None = None,
        node_handlers: Mapping[int, Handler] | None = None,
        run_id: int = 7,
    ) -> None:
        self.contexts = {
            node: Context(
                run_id=run_id,
                node_id=node,
                node_config={**(node_config or {}), **(node_configs or {}).get(node, {})},
                state=RecordDict(),
                run_config={},
            )
            for node in node_ids
        }
        self.app = app
        self.contribute = contribute
        self.handlers: dict[str, Handler] = {
            MESSAGE_SETUP: lambda m, c: secure_aggregation.run_secagg_setup(
                m,
                c,
                contribute=self.contribute,
                integer_vector=integer_vector,
                result_length=result_length,
            ),
            MESSAGE_SETUP_SHARE: lambda m, c: secure_aggregation.run_secagg_setup_share(
                m,
                c,
                contribute=self.contribute,
                integer_vector=integer_vector,
                result_length=result_length,
            ),
            MESSAGE_SHARE: secure_aggregation.secagg_share,
            MESSAGE_MASKED: secure_aggregation.secagg_masked,
            MESSAGE_CONSISTENCY: secure_aggregation.secagg_consistency,
            MESSAGE_UNMASK: secure_aggregation.secagg_unmask,
        }
        # The same stages in evaluate messages (federated evaluation's sums).
        for kind, handler in list(self.handlers.items()):
            self.handlers[kind.replace("train.", "evaluate.")] = handler
        self.fault: Fault = lambda _type, _node: None
        self.rewrite: Rewrite | None = None
        self.node_handlers = dict(node_handlers or {})
        self.sent: list[Message] = []
        self.received: list[Message] = []

    def get_node_ids(self) -> list[int]:
        return sorted(self.contexts)

    def handler(self, message_type: str) -> Handler:
        return self.app if self.app is not None else self.handlers[message_type]

    def send_and_receive(self, messages, *, timeout=None):  # type: ignore[no-untyped-def]
        replies = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = uuid4().hex
            node, kind = msg.metadata.dst_node_id, msg.metadata.message_type
            self.sent.append(msg)
            fault = self.fault(kind, node)
            if fault == "drop":
                continue
            if fault == "error":
                replies.append(Message(Error(code=2, reason="injected fault"), reply_to=msg))
                continue
            # A setup-and-share request carries its share-keys payload in ``secagg_share``.
            for name in ("secagg", "secagg_share"):
                if self.rewrite is None or name not in msg.content.config_records:
                    continue
                payload = {  # a copy: lists may be shared with other sites' requests
                    key: list(value) if isinstance(value, list) else value
                    for key, value in msg.content.config_records[name].items()
                }
                msg.content.config_records[name] = ConfigRecord(self.rewrite(kind, node, payload))
            handler = self.node_handlers.get(node) or self.handler(kind)
            replies.append(handler(msg, self.contexts[node]))
        self.received.extend(replies)
        return replies

    def sent_types(self) -> list[str]:
        return [msg.metadata.message_type for msg in self.sent]

    def replies_to(self, message_type: str) -> list[Message]:
        return [reply for reply in self.received if reply.metadata.message_type == message_type]


def train_request(server_round: int, task: SiteTask = SiteTask.LOCAL_DP_SGD) -> ConfigRecord:
    """The ``config`` record of a round's request with the run config's defaults."""
    request = TrainRequest.for_round(FederationConfig(), server_round)
    return ConfigRecord(task_config(task, request.to_config()))


def run_secure_round(
    aggregation: Any,
    grid: InProcessGrid,
    arrays: ArrayRecord,
    server_round: int,
    *,
    task: SiteTask = SiteTask.LOCAL_DP_SGD,
) -> Any:
    """One round of ``aggregation`` over every node of ``grid``, asking for ``task`` on
    ``arrays``, as a training mode does (``server.round_modes.send_task``)."""
    config = FederationConfig()
    max_steps = config.local_epochs * -(-config.secagg_max_weight // config.batch_size)
    request = RoundRequest(
        round_id=server_round,
        content=RecordDict(
            {RECORD_ARRAYS: arrays, RECORD_CONFIG: train_request(server_round, task)}
        ),
        shapes=[(key, tuple(arrays[key].shape)) for key in arrays],
        metric_ranges=metric_ranges(max_weight=config.secagg_max_weight, max_steps=max_steps),
        timeout=60.0,
    )
    return aggregation.run_round(grid, request, node_ids=grid.get_node_ids())
