"""Sites' registered names for the coordinator's logs and reports (node ids mean little).

``fedmm coordinator register-site --name NAME`` stores the name with the site's key at the
SuperLink (``flwr supernode register --name``). Flower 1.41's SuperLink returns it in each
node's ``NodeInfo.name`` (Control API ``ListNodes``), but ``flwr supernode list`` does not
print it (``flwr/cli/supernode/ls.py``, ``_format_nodes`` and ``_to_json`` leave the field
out), so it is read here through the same Control API client the ``flwr`` CLI uses.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path

SITES_FILE = "sites.json"
_NODE_ID = re.compile(r"(?<![\d.])(\d{6,20})(?![\d.])")


def registered_site_names(connection: str) -> dict[int, str]:
    """Node id -> registered name of every site the SuperLink knows (named ones only)."""
    from flwr.cli.flower_config import read_superlink_connection
    from flwr.cli.utils import init_http_client_from_connection
    from flwr.proto.control_pb2 import ListNodesRequest  # pylint: disable=E0611

    client = init_http_client_from_connection(read_superlink_connection(connection))
    try:
        response = client.ListNodes(ListNodesRequest())
    finally:
        client.close()
    return {int(node.node_id): node.name for node in response.nodes_info if node.name}


def name_node_ids(line: str, names: Mapping[int, str]) -> str:
    """``line`` with each known node id followed by its site's name: ``123 (site-a)``."""
    if not names:
        return line

    def named(match: re.Match[str]) -> str:
        name = names.get(int(match.group(1)))
        return match.group(0) if name is None else f"{match.group(1)} ({name})"

    return _NODE_ID.sub(named, line)


def write_sites_file(out_dir: Path, names: Mapping[int, str]) -> Path:
    """``sites.json`` in the run's out dir: node id -> registered name."""
    path = Path(out_dir) / SITES_FILE
    path.write_text(json.dumps({str(k): v for k, v in sorted(names.items())}, indent=2) + "\n")
    return path


def sites_section(names: Mapping[int, str]) -> str:
    """A Markdown section naming the sites behind the node ids of a report."""
    rows = "\n".join(f"| {node_id} | {name} |" for node_id, name in sorted(names.items()))
    return (
        "\n## Sites\n\nRegistered names of the sites the SuperLink knew when the run was "
        "submitted (added by `fedmm coordinator submit`).\n\n| node id | site |\n|---|---|\n"
        f"{rows}\n"
    )
