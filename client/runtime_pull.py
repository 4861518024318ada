"""Pulling a task's input from the site's own SuperNode without Flower's 1 s backoff.

Flower 1.41's ``flwr.supernode.runtime.run_clientapp.pull_task_input`` pulls the message's
objects with ``pull_and_inflate_object_from_tree``'s default backoff: 1 s after the first
"not there yet", then 2, 4, 8 s. The SuperNode creates the task (which the site's executor
claims within a tenth of a second) before it has pulled the message's objects from the
SuperLink, so a prompt runner almost always hears "not there yet" once: it then slept 1 s,
and 7-15 s for a training message whose model was still arriving. Here the same calls, in
the same order, with a backoff for a local object store: 20 ms, doubling up to 0.25 s.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from flwr.app import Context, Message
    from flwr.supercore.fab import Fab
    from flwr.supercore.run import Run
    from flwr.supercore.runtime import RuntimeHttpClient

INITIAL_BACKOFF_S = 0.02
BACKOFF_CAP_S = 0.25


def pull_task_input(client: RuntimeHttpClient) -> tuple[Message, Context, Run, Fab]:
    """The task's message, context, run and FAB, as Flower's function of that name returns
    them."""
    from flwr.app import Message
    from flwr.common.serde import context_from_proto, fab_from_proto, run_from_proto
    from flwr.proto.node_pb2 import Node  # pylint: disable=E0611
    from flwr.proto.runtime_pb2 import (  # pylint: disable=E0611
        PullAppMessagesRequest,
        PullTaskInputRequest,
    )
    from flwr.supercore.inflatable.inflatable_protobuf_utils import (
        make_confirm_message_received_fn_protobuf,
        make_pull_object_fn_protobuf,
    )
    from flwr.supercore.inflatable.inflatable_utils import pull_and_inflate_object_from_tree
    from flwr.supercore.task_identity import TaskIdentity

    response = client.PullTaskInput(PullTaskInputRequest())
    TaskIdentity.task_id = response.task_id
    TaskIdentity.run_id = response.run.run_id
    TaskIdentity.node_id = response.context.node_id
    context = context_from_proto(response.context)
    run = run_from_proto(response.run)
    fab = fab_from_proto(response.fab)
    messages = client.PullMessages(PullAppMessagesRequest())
    if not messages.messages_list:
        raise RuntimeError("No messages received from Runtime API")
    node = Node(node_id=context.node_id)
    object_tree = messages.message_object_trees[0]
    message = pull_and_inflate_object_from_tree(
        object_tree,
        make_pull_object_fn_protobuf(client.PullObject, node, context.run_id),
        make_confirm_message_received_fn_protobuf(
            client.ConfirmMessageReceived, node, context.run_id
        ),
        return_type=Message,
        initial_backoff=INITIAL_BACKOFF_S,
        backoff_cap=BACKOFF_CAP_S,
    )
    # The deflated message does not hold its own id (its object id): set it, as Flower does.
    message.metadata.__dict__["_message_id"] = object_tree.object_id
    return message, context, run, fab
