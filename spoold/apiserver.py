"""Running `spoold api`: the keys, where to listen, uvicorn, SIGHUP.

Without a keys file the API serves only on loopback, as the one tenant
`local`, and says so in the log; anywhere else it refuses to start, since
the spool's files hold people's data. SIGHUP reads the keys file again
(a bad file keeps the old keys, and says why).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import signal
from pathlib import Path

import uvicorn
from fastapi import FastAPI

from .api import create_app
from .apikeys import ApiKeys, KeysError, read_keys
from .config import Config, ConfigError
from .retention import sweep_forever

log = logging.getLogger(__name__)


def listen_address(listen: str) -> tuple[str, int] | str:
    """`[api] listen` as (host, port), or a unix socket path; ConfigError naming the key if neither."""
    if listen.startswith("/"):
        return listen
    host, sep, port = listen.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"[api] listen = {listen!r}: expected HOST:PORT (e.g. 127.0.0.1:8090) or a "
                          "unix socket path")
    return host, int(port)


def is_loopback(address: tuple[str, int] | str) -> bool:
    """Whether only this machine can connect (a unix socket counts: its file mode decides)."""
    if isinstance(address, str):
        return True
    host = address[0]
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def load_keys(config: Config, address: tuple[str, int] | str, required: bool = False) -> ApiKeys | None:
    """The API's keys, or None for the one `local` tenant on loopback; ConfigError where that is unsafe.

    `required`: a reload of an API that had keys never falls back to no keys.
    """
    path = Path(config.api.keys_file) if config.api.keys_file else None
    if path is not None and (path.exists() or required):
        try:
            keys = read_keys(path)
        except KeysError as e:
            raise ConfigError(f"[api] keys_file: {e}") from None
        log.info("API keys: %d tenant key(s) from %s", len(keys), path)
        return keys
    if not is_loopback(address):
        raise ConfigError(f"[api] keys_file: {path or '(none)'} does not exist, and [api] listen = "
                          f"{config.api.listen!r} is not loopback: refusing to serve the spool to the network "
                          "without keys (write NAME:KEY lines there, or listen on 127.0.0.1)")
    log.warning("no API keys file (%s): serving loopback only, every request as the one tenant 'local'", path)
    return None


def base_url(config: Config, address: tuple[str, int] | str) -> str | None:
    """What a client gives the SDK as `base_url`: `[api] public_url` + /v1, else the listen address's."""
    if config.api.public_url:
        return config.api.public_url.rstrip("/").removesuffix("/v1") + "/v1"
    if isinstance(address, str):
        return None  # a unix socket: clients reach it through a proxy, whose URL public_url names
    host = f"[{address[0]}]" if ":" in address[0] else address[0]
    return f"http://{host}:{address[1]}/v1"


def serve(config: Config) -> int:
    """Serve the API until SIGTERM or SIGINT; SIGHUP reloads the keys. Expired files are swept meanwhile."""
    address = listen_address(config.api.listen)
    app = create_app(config, load_keys(config, address))
    where = {"uds": address} if isinstance(address, str) else {"host": address[0], "port": address[1]}
    log.info("serving the OpenAI Files and Batches API on %s; clients use OpenAI(base_url=%r)",
             config.api.listen, base_url(config, address) or "(set [api] public_url)")
    server = uvicorn.Server(uvicorn.Config(app, **where, log_config=None, access_log=False,
                                           server_header=False, lifespan="on"))

    async def main() -> None:
        asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, _reload_keys, app, config, address)
        sweeping = asyncio.create_task(sweep_forever(app.state.sweeper))
        try:
            await server.serve()
        finally:
            sweeping.cancel()
    # uvicorn stops gracefully on SIGTERM/SIGINT, then raises the signal again
    # under the handlers it found: these, so a clean stop exits 0 for systemd.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    asyncio.run(main())
    log.info("stopped")
    return 0


def _reload_keys(app: FastAPI, config: Config, address: tuple[str, int] | str) -> None:
    try:
        app.state.keys = load_keys(config, address, required=app.state.keys is not None)
    except ConfigError as e:
        log.error("reload: %s; keeping the current keys", e)
