"""The Fleet proxy's configuration: only the Fleet calls of an authenticated SuperNode are
forwarded, and Debian's nginx accepts the file as written (``nginx -t``)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from fedmm.server.certificate_authority import init_ca, issue_server_certificate
from fedmm.server.fleet_proxy import fleet_api_paths, fleet_proxy
from fedmm.simulations.loopback_daemons import free_port


def test_only_fleet_paths_of_an_authenticated_supernode_are_forwarded(tmp_path: Path) -> None:
    paths = fleet_api_paths()
    assert "/v1/fleet/pull-messages" in paths and "/v1/fleet/activate-node" in paths
    assert all(p.startswith("/v1/fleet/") for p in paths)
    assert "/v1/fleet/register-node" not in paths  # self-registration: no key, not forwarded
    init_ca(tmp_path / "ca")
    issue_server_certificate(tmp_path / "ca", subject_alternative_names=["127.0.0.1"])
    ca = tmp_path / "ca"
    proxy = fleet_proxy(
        ca,
        public_host="127.0.0.1",
        public_port=free_port(),
        superlink_port=free_port(),
        certificate=ca / "superlink.crt",
        key=ca / "superlink.key",
        ca_certificate=ca / "ca.crt",
    )
    text = proxy.config_text
    forwarded = re.findall(r"location = (\S+) \{", text)
    assert forwarded == paths
    assert re.findall(r"proxy_pass https://superlink(\S+);", text) == paths  # fixed paths
    assert "location / {\n            return 403;" in text
    assert "proxy_ssl_verify on;" in text and "/v1/control" not in text
    assert not proxy.config_file.exists()  # nothing written until asked
    proxy.write()
    assert oct(proxy.config_file.stat().st_mode & 0o777) == "0o600"
    tested = subprocess.run(proxy.test_argv, capture_output=True, text=True, timeout=30)
    assert tested.returncode == 0, tested.stderr
