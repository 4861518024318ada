"""The coordinator's public port: nginx terminating TLS and forwarding only the Fleet API.

``flower-superlink`` 1.41 serves the Fleet API (``/v1/fleet/...``, the sites' SuperNodes),
the Control API (``/v1/control/...``: ``flwr run``, ``flwr supernode register``, ``flwr
stop``, with no authentication) and the Runtime API on one port. Behind this proxy the
SuperLink binds to loopback, where only the coordinator machine reaches its Control API,
and sites reach the public address, where nginx:

- terminates TLS with the SuperLink's certificate (``superlink.crt``/``.key``);
- forwards exactly the Fleet API calls an authenticated SuperNode makes (``POST``, one
  exact-match ``location`` per path, taken from Flower's own Fleet router; the rewritten
  path is fixed in the config, so no unusual spelling of a URI reaches another API), to the
  SuperLink over TLS verified with the CA (``localhost``, a name the certificate has);
- answers everything else with 403. The Fleet API's self-registration calls
  (``register-node``, ``unregister-node``, used only by SuperNodes without a key) are not
  forwarded either.

nginx rather than haproxy (both are Debian packages; envoy is not): exact path matches,
TLS on both legs with upstream verification and streaming request and response bodies are
each one directive, and most operators already know its configuration. It runs in the
foreground under the coordinator's supervisor; its files live in ``DIR/proxy/``.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from fedmm.common.key_files import PRIVATE_DIR_MODE
from fedmm.server.superlink_control import DeploymentError

PROXY_DIR = "proxy"
CONFIG_FILE = "nginx.conf"
#: Fleet calls of SuperNodes with an authentication key (self-registration left out).
SELF_REGISTRATION = ("/v1/fleet/register-node", "/v1/fleet/unregister-node")
#: The SuperLink's certificate names loopback as ``localhost`` (nginx checks DNS names).
UPSTREAM_NAME = "localhost"
#: Largest request body: a Fleet object push (model arrays in chunks); FABs use Control.
MAX_BODY = "256m"


def fleet_api_paths() -> list[str]:
    """The Fleet API paths of this Flower version (its router), without self-registration."""
    from flwr.superlink.routers.fleet.router import router

    paths = sorted(route.path for route in router.routes if hasattr(route, "path"))
    return [path for path in paths if path not in SELF_REGISTRATION]


def nginx_executable() -> str:
    found = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/sbin")
    if found is None:
        raise DeploymentError(
            "nginx is not installed: the public port is an nginx reverse proxy (install "
            "Debian's package: apt-get install nginx; `bash .ci/setup` does)"
        )
    return found


@dataclass(frozen=True)
class FleetProxy:
    """nginx's config (written by :meth:`write`), and the commands that test and run it."""

    config_file: Path
    config_text: str
    argv: list[str]
    test_argv: list[str]

    def write(self) -> Path:
        """``DIR/proxy/nginx.conf`` (0600, in a 0700 folder with nginx's temp folder)."""
        proxy_dir = self.config_file.parent
        (proxy_dir / "tmp").mkdir(mode=PRIVATE_DIR_MODE, parents=True, exist_ok=True)
        os.chmod(proxy_dir, PRIVATE_DIR_MODE)
        fd = os.open(self.config_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(self.config_text)
        return self.config_file


def proxy_config(
    *,
    public_host: str,
    public_port: int,
    superlink_port: int,
    certificate: Path,
    key: Path,
    ca_certificate: Path,
    directory: Path,
    paths: list[str],
) -> str:
    """nginx's configuration (the whole file)."""
    host = f"[{public_host}]" if ":" in public_host else public_host
    user = "user nobody nogroup;\n" if os.geteuid() == 0 else ""
    locations = "\n".join(
        f"        location = {path} {{\n"
        "            limit_except POST { deny all; }\n"
        f"            proxy_pass https://superlink{path};\n"
        "        }"
        for path in paths
    )
    return f"""# Written by `fedmm coordinator start-superlink` at each start (edits are lost).
# Public port for the sites: TLS, and only the Fleet API of an authenticated SuperNode.
{user}worker_processes 1;
pid {directory / "nginx.pid"};
error_log stderr notice;
events {{
    worker_connections 512;
}}
http {{
    access_log {directory / "access.log"};
    client_body_temp_path {directory / "tmp" / "body"};
    proxy_temp_path {directory / "tmp" / "proxy"};
    fastcgi_temp_path {directory / "tmp" / "fastcgi"};
    uwsgi_temp_path {directory / "tmp" / "uwsgi"};
    scgi_temp_path {directory / "tmp" / "scgi"};
    server_tokens off;
    upstream superlink {{
        server 127.0.0.1:{superlink_port};
        keepalive 16;
    }}
    server {{
        listen {host}:{public_port} ssl;
        ssl_certificate {certificate};
        ssl_certificate_key {key};
        ssl_protocols TLSv1.2 TLSv1.3;
        client_max_body_size {MAX_BODY};
        client_body_timeout 300s;
        proxy_http_version 1.1;
        proxy_set_header Connection "";
        proxy_request_buffering off;
        proxy_buffering off;
        proxy_read_timeout 300s;
        proxy_send_timeout 300s;
        proxy_ssl_verify on;
        proxy_ssl_trusted_certificate {ca_certificate};
        proxy_ssl_name {UPSTREAM_NAME};
        proxy_ssl_server_name on;
        proxy_ssl_protocols TLSv1.2 TLSv1.3;
{locations}
        location / {{
            return 403;
        }}
    }}
}}
"""


def fleet_proxy(
    directory: Path,
    *,
    public_host: str,
    public_port: int,
    superlink_port: int,
    certificate: Path,
    key: Path,
    ca_certificate: Path,
) -> FleetProxy:
    """The proxy for the CA folder ``directory``: its config in ``DIR/proxy/nginx.conf``."""
    proxy_dir = Path(directory).resolve() / PROXY_DIR
    text = proxy_config(
        public_host=public_host,
        public_port=public_port,
        superlink_port=superlink_port,
        certificate=certificate,
        key=key,
        ca_certificate=ca_certificate,
        directory=proxy_dir,
        paths=fleet_api_paths(),
    )
    config_file = proxy_dir / CONFIG_FILE
    base = [nginx_executable(), "-p", str(proxy_dir), "-c", str(config_file), "-e", "stderr"]
    return FleetProxy(
        config_file=config_file,
        config_text=text,
        argv=[*base, "-g", "daemon off;"],
        test_argv=[*base, "-t", "-q", "-g", "daemon off;"],
    )
