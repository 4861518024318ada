"""Messages at a site, run by the site's own installed code.

``python -I -m fedmm.client.site_runner --serve``: one warm process that runs task after task
(one task token a line on standard input, until it closes), so Python, Flower and the
site's code are imported once, and what the site's code keeps in memory between messages
(its de-identified records, fixed scattering features, the tokenizer's cache) is computed
once; without ``--serve``, one task and exit.

This replaces Flower's ``flwr-clientapp`` at a deployed site. ``flower-supernode
--isolation process`` starts no app process itself; :mod:`client.site_executor` claims each
task from the SuperNode's Runtime API and starts this module for it. Here, as in
``flwr-clientapp``, the task's message, context, run and FAB are pulled through Flower's
Runtime API client, and the reply is pushed back. What differs:

- the FAB is never unpacked, installed or imported: its SHA-256 is compared with the
  site's pinned release (:mod:`client.release_pin`); another app is refused with the code
  ``untrusted-app`` before anything else happens, the reason goes to the site's log and the
  refusal to its audit log (:mod:`client.site_audit`);
- the ClientApp is ``client.app:app`` of the installed release, imported from
  site-packages (``-I``: neither the working directory nor ``PYTHONPATH`` is on
  ``sys.path``);
- an exception in the ClientApp reaches the coordinator as the code ``site-error`` (error
  code 2, "ClientApp raised"), while its text, which may name the site's files, stays in
  the site's log (``flwr-clientapp`` would send the text).

The task token arrives on standard input, not on the command line (which other local users
can read).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from typing import IO, TYPE_CHECKING

from fedmm.client.release_pin import ReleasePin, check_run_app, normalise_digest
from fedmm.client.site_audit import record_refusal
from fedmm.client.site_replies import refusal_reply
from fedmm.common.site_refusal import RefusalCode

if TYPE_CHECKING:
    from flwr.app import Message

logger = logging.getLogger("fedmm.site_runner")


def error_reply(message: Message) -> Message:
    """The reply to a message the site's code failed on: a code, never the error's text."""
    from flwr.app import Message
    from flwr.app.error import Error
    from flwr.common.constant import ErrorCode

    error = Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=RefusalCode.SITE_ERROR.value)
    return Message(error, reply_to=message)


def run_task(*, runtime_api_address: str, token: str, pin: ReleasePin) -> int:
    """Pull the task, check its app, run the installed ClientApp, push the reply; 0 when a
    reply (answer, refusal or error code) was delivered."""
    from flwr.common.constant import SubStatus
    from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
    from flwr.supercore.interceptors import (
        RuntimeTokenHttpInterceptor,
        RuntimeVersionHttpInterceptor,
    )
    from flwr.supercore.retry import make_simple_http_retry_invoker
    from flwr.supercore.runtime import RuntimeHttpClient
    from flwr.supernode.runtime.run_clientapp import push_message, push_task_output

    from fedmm.client.runtime_pull import pull_task_input  # Flower's, with a local backoff

    retry = make_simple_http_retry_invoker()
    client = RuntimeHttpClient.from_server_address(
        server_address=runtime_api_address,
        insecure=True,  # the SuperNode's Runtime API on this machine's loopback
        root_certificates=None,
        interceptors=[
            RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"),
            RuntimeTokenHttpInterceptor(token),
        ],
        retry_invoker=retry,
    )
    heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(client))
    heartbeat.start()
    message = context = reply = None
    sub_status, details, status = SubStatus.FAILED, RefusalCode.SITE_ERROR.value, 1
    started = time.monotonic()
    pulled = ran = started
    try:
        message, context, run, fab = pull_task_input(client)
        pulled = time.monotonic()
        refusal = check_run_app(
            pin=pin, fab_content=fab.content, fab_id=run.fab_id, fab_version=run.fab_version
        )
        if refusal is not None:
            logger.error("refused run %s (%s): %s", run.run_id, refusal.code, refusal.detail)
            reply, details = refusal_reply(message, refusal), refusal.code.value
            record_refusal(  # the site's audit log (the app's own refusals: its mod)
                context.node_config,
                run_id=run.run_id,
                message=message,
                code=details,
                reason=refusal.detail,
            )
        else:
            from fedmm.client.app import app  # the installed release, never the FAB

            reply, details = app(message=message, context=context), ""
        ran = time.monotonic()
        sub_status = SubStatus.COMPLETED
    except Exception:
        logger.exception("the site's ClientApp failed; the coordinator gets only 'site-error'")
        if message is not None:
            reply = error_reply(message)
        context = None  # a handler that raised leaves the node's state as it was
    finally:
        try:
            if reply is not None and message is not None:
                push_message(client, reply, message_context(context, message))
                status = 0
        except Exception:
            logger.exception("could not deliver the reply to the SuperNode")
        retry.max_tries = 1
        push_task_output(client=client, context=context, sub_status=sub_status, details=details)
        heartbeat.stop()
        client.close()
    if message is not None:
        logger.info(
            "%s: pulled in %.2f s, ran in %.2f s, replied in %.2f s",
            message.metadata.message_type,
            pulled - started,
            max(0.0, ran - pulled),
            time.monotonic() - max(ran, pulled),
        )
    return status


def message_context(context: object, message: Message) -> object:
    """The context :func:`push_message` needs (it reads ``node_id`` and ``run_id``)."""
    if context is not None:
        return context
    from types import SimpleNamespace

    return SimpleNamespace(node_id=message.metadata.dst_node_id, run_id=message.metadata.run_id)


def serve(*, runtime_api_address: str, pin: ReleasePin, tokens: IO[str]) -> int:
    """Run a task for every token line of ``tokens`` until it closes; 0."""
    import fedmm.client.app  # noqa: F401 - import the ClientApp (no torch) before the first task

    for line in iter(tokens.readline, ""):
        token = line.strip()
        if not token:
            continue
        try:
            run_task(runtime_api_address=runtime_api_address, token=token, pin=pin)
        except Exception:  # the SuperNode went away mid-task: the next task may still run
            logger.exception("task failed outside the site's ClientApp")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fedmm.client.site_runner", description=__doc__)
    parser.add_argument("--runtime-api-address", required=True, metavar="HOST:PORT")
    parser.add_argument("--release-version", required=True)
    parser.add_argument("--release-digest", required=True)
    parser.add_argument(
        "--serve", action="store_true", help="run a task per token line until stdin closes"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s fedmm-site-runner %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    for chatty in ("httpx", "httpcore"):  # a line per Runtime API request otherwise
        logging.getLogger(chatty).setLevel(logging.WARNING)
    pin = ReleasePin(args.release_version, normalise_digest(args.release_digest))
    if args.serve:
        return serve(runtime_api_address=args.runtime_api_address, pin=pin, tokens=sys.stdin)
    token = sys.stdin.readline().strip()
    if not token:
        parser.error("no task token on standard input")
    return run_task(runtime_api_address=args.runtime_api_address, token=token, pin=pin)


if __name__ == "__main__":
    sys.exit(main())
