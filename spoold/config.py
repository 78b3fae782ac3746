"""spoold's settings: a TOML file parsed into frozen dataclasses.

Every key has its default here and only here, so a config that names only
`[engine] model` works. Unknown keys and bad values stop the daemon at start
with an error naming the key, because a typo that silently falls back to a
default is how overnight runs go wrong.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

import tomllib

#: Where the daemon and every CLI verb look when `--config` is not given.
DEFAULT_CONFIG_PATH = "/etc/spoold/spoold.toml"

#: The engine adapter used unless `[engine] adapter` names another.
DEFAULT_ADAPTER = "spoold.vllm_adapter:VllmEngine"
#: `[engine] max_inflight = 0` means this many requests in flight per engine sequence slot.
INFLIGHT_PER_SEQ = 8


class ConfigError(Exception):
    """A setting is missing, unknown or has a bad value; the message says which."""


@dataclass(frozen=True)
class SpoolSettings:
    """`[spool]`: where the queue lives and how drops are picked up."""

    root: Path = Path("/var/spool/spoold")
    host_id: str = field(default_factory=socket.gethostname)
    settle_seconds: float = 5.0
    poll_seconds: float = 2.0
    claim_timeout: float = 600.0
    #: jobs of the loaded model that run at once, sharing the engine's in-flight window
    max_active_jobs: int = 64
    #: a batch with more valid lines than this becomes a group of parts any daemon on the spool may run
    #: (groups.py); 0 never splits
    split_lines: int = 20000
    file_mode: int = 0o640
    group: str = ""
    state_dir: str = ""


@dataclass(frozen=True)
class EngineSettings:
    """`[engine]`: which adapter runs requests and how vLLM is built."""

    adapter: str = DEFAULT_ADAPTER
    model: str = ""
    dtype: str = "auto"
    max_model_len: int = 0
    max_num_seqs: int = 256
    gpu_memory_utilization: float = 0.9
    enable_prefix_caching: bool = True
    enforce_eager: bool = False
    tensor_parallel_size: int = 1
    #: engine replicas in one daemon, vLLM's own load balancing across them (one GPU each, times
    #: tensor_parallel_size); multi-node options go in [engine.args] as `vllm serve` takes them
    data_parallel_size: int = 1
    max_inflight: int = 0
    #: tries a line gets when the engine answers 5xx, dies under it or its model fails to load
    max_attempts: int = 3
    #: the wait before a line's second try; each next one waits twice as long (with jitter)
    retry_backoff_seconds: float = 1.0
    args: dict[str, Any] = field(default_factory=dict)

    @property
    def inflight_limit(self) -> int:
        """Requests handed to the engine at once: enough to keep it full.

        Its own queue must never run dry while the serving layer catches up
        on a wave of finished requests: measured on 2 cores, 8 x max_num_seqs
        ran 10-17% faster than 2 x (README, Performance). With data
        parallelism each replica batches `max_num_seqs`.
        """
        return self.max_inflight or INFLIGHT_PER_SEQ * self.max_num_seqs * max(1, self.data_parallel_size)


#: `[engine]` keys a `[models.NAME]` table may set for that model alone.
PER_MODEL_KEYS = ("dtype", "max_model_len", "max_num_seqs", "gpu_memory_utilization",
                  "enable_prefix_caching", "enforce_eager", "tensor_parallel_size", "data_parallel_size",
                  "max_inflight")


@dataclass(frozen=True)
class ModelSettings:
    """`[models]`: alias → Hugging Face id or local path, with optional per-model engine settings.

    `settings` maps a model (id or path) to its `[engine]` overrides and its
    vLLM arguments (`chat_template`, anything under `args`).
    """

    aliases: dict[str, str] = field(default_factory=dict)
    settings: dict[str, dict[str, Any]] = field(default_factory=dict)
    max_wait_seconds: float = 600.0
    gpu_hour_price: float = 0.0


@dataclass(frozen=True)
class LimitsSettings:
    """`[limits]`: what a dropped file may not exceed."""

    max_line_bytes: int = 4 * 1024 * 1024
    #: a sparse or endless drop fails at once instead of holding the engine
    max_file_bytes: int = 50 * 1024 ** 3
    #: what one line may ask the engine to produce: n x max_tokens (none set: the context) x (1 + logprobs per token)
    max_output_tokens_per_line: int = 1024 * 1024
    #: hosts a line's image_url (video, audio, file) may be fetched from; none by default: only data: URLs
    allowed_media_domains: tuple[str, ...] = ()


@dataclass(frozen=True)
class HeartbeatSettings:
    """`[heartbeat]`: how often heartbeat.json is replaced."""

    seconds: float = 5.0


@dataclass(frozen=True)
class WatchdogSettings:
    """`[watchdog]`: how long in-flight work may make no progress."""

    stall_seconds: float = 300.0
    #: a stall this long makes the daemon replace the engine itself; under
    #: systemd the watchdog (WatchdogSec after the stall) usually acts first
    restart_seconds: float = 600.0


@dataclass(frozen=True)
class EventsSettings:
    """`[events]`: the ZeroMQ progress feed."""

    endpoint: str = ""
    progress_seconds: float = 1.0


@dataclass(frozen=True)
class MetricsSettings:
    """`[metrics]`: the Prometheus endpoint and textfile."""

    listen: str = "127.0.0.1:9464"
    textfile: str = ""


@dataclass(frozen=True)
class ApiSettings:
    """`[api]`: the OpenAI-compatible HTTP API (`spoold api`)."""

    #: HOST:PORT, or the path of a unix socket
    listen: str = "127.0.0.1:8090"
    #: `NAME:KEY[:admin]` per line; without it the API serves loopback only, as the one tenant `local`
    keys_file: str = "/etc/spoold/api-keys"
    max_upload_bytes: int = 2 * 1024 ** 3
    #: how long uploaded files, and a finished batch's results, are kept: "30d", "12h", or "never"
    file_retention: str = "30d"
    #: the URL clients reach the API at, when a proxy stands in front ("https://gpu-box.example.com");
    #: `spoold api` logs the SDK's base_url from it at start
    public_url: str = ""


@dataclass(frozen=True)
class TenantWebhook:
    """`[webhooks.NAME]`: the receiver of API key NAME's tenant, for its batches, with its own secret."""

    url: str = ""
    secret_file: str = ""


@dataclass(frozen=True)
class WebhooksSettings:
    """`[webhooks]`: where the daemon posts a signed event when a job ends (off while `url` is empty)."""

    #: http(s) URL of the receiver; only this config names one, never a submitter
    url: str = ""
    #: file holding the signing secret, `whsec_...` as OpenAI issues them
    secret_file: str = "/etc/spoold/webhook-secret"
    #: how long one try may take
    timeout_seconds: float = 10.0
    #: how long a delivery is retried before it is given up (72 h)
    max_age_seconds: float = 72 * 3600.0
    #: `[webhooks.NAME]` tables: API key name -> that tenant's own receiver
    tenants: dict[str, TenantWebhook] = field(default_factory=dict)


@dataclass(frozen=True)
class Config:
    """All of spoold's settings, one frozen section per TOML table."""

    spool: SpoolSettings = field(default_factory=SpoolSettings)
    engine: EngineSettings = field(default_factory=EngineSettings)
    models: ModelSettings = field(default_factory=ModelSettings)
    limits: LimitsSettings = field(default_factory=LimitsSettings)
    heartbeat: HeartbeatSettings = field(default_factory=HeartbeatSettings)
    watchdog: WatchdogSettings = field(default_factory=WatchdogSettings)
    events: EventsSettings = field(default_factory=EventsSettings)
    metrics: MetricsSettings = field(default_factory=MetricsSettings)
    api: ApiSettings = field(default_factory=ApiSettings)
    webhooks: WebhooksSettings = field(default_factory=WebhooksSettings)


def config_path(cli_value: str | None) -> str:
    """The config file to read: `--config`, else `$SPOOLD_CONFIG`, else the default."""
    return cli_value or os.environ.get("SPOOLD_CONFIG") or DEFAULT_CONFIG_PATH


def load_config(path: str | os.PathLike, *, must_exist: bool = False) -> Config:
    """Read and check a config file; a missing file means all defaults.

    Raises ConfigError naming the file and key for anything wrong.
    """
    try:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
    except FileNotFoundError:
        if must_exist:
            raise ConfigError(f"{path}: no such config file") from None
        return Config()
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror}") from None
    try:
        return parse_config(raw)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def parse_config(raw: dict[str, Any]) -> Config:
    """Build a Config from an already-parsed TOML table."""
    sections = {}
    hints = get_type_hints(Config)
    for name, value in raw.items():
        if name not in hints:
            raise ConfigError(_unknown(f"[{name}]", name, hints))
        if not isinstance(value, dict):
            raise ConfigError(f"[{name}] must be a table")
        if name == "models":
            sections[name] = _parse_models(value)
        elif name == "webhooks":
            sections[name] = _parse_webhooks(value)
        else:
            sections[name] = _parse_section(hints[name], name, value)
    config = Config(**sections)
    _check_together(config)
    return config


#: `[api] file_retention`: a whole number of hours or days, or "never".
RETENTION = re.compile(r"([1-9][0-9]{0,4})([hd])")


def retention_seconds(text: str) -> int | None:
    """`[api] file_retention` in seconds (None: kept until deleted); ConfigError saying what is accepted."""
    if text == "never":
        return None
    match = RETENTION.fullmatch(text)
    if match is None:
        raise ConfigError(f"[api] file_retention = {text!r}: expected hours or days, such as \"30d\" or "
                          "\"12h\", or \"never\" to keep files until they are deleted")
    return int(match[1]) * (3600 if match[2] == "h" else 86400)


#: A peer is presumed dead only after this many of its heartbeats failed to come.
MIN_HEARTBEATS_PER_CLAIM_TIMEOUT = 3


def _check_together(config: Config) -> None:
    """Settings that are fine alone but wrong together (or wrong in a way their type cannot say)."""
    retention_seconds(config.api.file_retention)
    for key, url in (("[api] public_url", config.api.public_url), ("[webhooks] url", config.webhooks.url)):
        _check_url(key, url)
    if config.webhooks.url and not config.webhooks.secret_file:
        raise ConfigError("[webhooks] secret_file: a webhook URL needs a secret to sign with (a file holding "
                          "whsec_...)")
    for name, tenant in config.webhooks.tenants.items():
        if not tenant.url or not tenant.secret_file:
            raise ConfigError(f"[webhooks.{name}]: needs both url and secret_file (the tenant's own receiver "
                              "and the whsec_... secret it verifies with)")
        _check_url(f"[webhooks.{name}] url", tenant.url)
    if config.webhooks.timeout_seconds <= 0:
        raise ConfigError("[webhooks] timeout_seconds must be more than 0")
    if config.engine.max_attempts < 1:
        raise ConfigError(f"[engine] max_attempts = {config.engine.max_attempts}: a line needs at least 1 try "
                          "(1 never retries)")
    if config.spool.max_active_jobs < 1:
        raise ConfigError(f"[spool] max_active_jobs = {config.spool.max_active_jobs}: at least 1 job must "
                          "be able to run (1 runs one job at a time)")
    if config.spool.split_lines < 0:
        raise ConfigError(f"[spool] split_lines = {config.spool.split_lines}: give 0 (never split) or the most "
                          "lines one part may have")
    least = MIN_HEARTBEATS_PER_CLAIM_TIMEOUT * config.heartbeat.seconds
    if config.spool.claim_timeout < least:
        raise ConfigError(f"[spool] claim_timeout = {config.spool.claim_timeout:g} is under "
                          f"{MIN_HEARTBEATS_PER_CLAIM_TIMEOUT} heartbeats ([heartbeat] seconds = "
                          f"{config.heartbeat.seconds:g}): a live host would look dead and lose its jobs; "
                          f"make it at least {least:g}")


def _check_url(key: str, url: str) -> None:
    """An http(s) URL, or empty."""
    if url and (not url.startswith(("http://", "https://")) or not url.split("://", 1)[1].strip("/")
                or any(c.isspace() for c in url)):
        raise ConfigError(f"{key} = {url!r}: expected an http:// or https:// URL, such as "
                          "\"https://gpu-box.example.com\"")


def _parse_webhooks(table: dict[str, Any]) -> WebhooksSettings:
    """`[webhooks]` keys, and a `[webhooks.NAME]` table per tenant with a receiver of its own."""
    tenants = {name: _parse_section(TenantWebhook, f"webhooks.{name}", value)
               for name, value in table.items() if isinstance(value, dict)}
    settings = _parse_section(WebhooksSettings, "webhooks", {k: v for k, v in table.items() if not isinstance(v, dict)})
    return dataclasses.replace(settings, tenants=tenants)


def _parse_models(table: dict[str, Any]) -> ModelSettings:
    aliases: dict[str, str] = {}
    settings: dict[str, dict[str, Any]] = {}
    kwargs: dict[str, Any] = {}
    for key, value in table.items():
        if key in ("max_wait_seconds", "gpu_hour_price"):
            kwargs[key] = _coerce(float, value, f"[models] {key}")
        elif isinstance(value, str) and value:
            aliases[key] = value
        elif isinstance(value, dict) and isinstance(value.get("model"), str) and value["model"]:
            model = aliases[key] = value["model"]
            for name in _coerce(list, value.get("served_names", []), f"[models.{key}] served_names"):
                aliases[str(name)] = model
            settings[model] = _parse_model_table(key, value)
        else:
            raise ConfigError(
                f"[models] {key!r}: expected a Hugging Face id or local path "
                f'(e.g. "{key}" = "Qwen/Qwen3-4B-Instruct-2507") or a table '
                "with a `model` key"
            )
    return ModelSettings(aliases=aliases, settings=settings, **kwargs)


def _parse_model_table(alias: str, table: dict[str, Any]) -> dict[str, Any]:
    """One `[models.ALIAS]` table: its engine overrides, checked like `[engine]`'s."""
    hints = get_type_hints(EngineSettings)
    known = set(PER_MODEL_KEYS) | {"model", "served_names", "chat_template", "args"}
    out: dict[str, Any] = {}
    for key, value in table.items():
        if key not in known:
            raise ConfigError(_unknown(f"[models.{alias}] {key}", key, dict.fromkeys(known)))
        if key in PER_MODEL_KEYS or key == "args":
            out[key] = _coerce(hints[key], value, f"[models.{alias}] {key}")
        elif key == "chat_template":
            out[key] = _coerce(str, value, f"[models.{alias}] {key}")
    return out


def engine_settings_for(config: "Config", model: str) -> EngineSettings:
    """`[engine]` with `model` and that model's own settings from `[models]` applied."""
    own = dict(config.models.settings.get(model, {}))
    args = {**config.engine.args, **own.pop("args", {})}
    if "chat_template" in own:
        args["chat_template"] = own.pop("chat_template")
    return dataclasses.replace(config.engine, model=model, args=args, **own)


def _parse_section(cls: type, name: str, table: dict[str, Any]) -> Any:
    hints = get_type_hints(cls)
    kwargs = {}
    for key, value in table.items():
        if key not in hints:
            raise ConfigError(_unknown(f"[{name}] {key}", key, hints))
        kwargs[key] = _coerce(hints[key], value, f"[{name}] {key}")
    return cls(**kwargs)


def _coerce(kind: Any, value: Any, where: str) -> Any:
    """Check one value against its declared type; ints are fine for floats."""
    origin = getattr(kind, "__origin__", kind)
    if kind is bool:
        ok = isinstance(value, bool)
    elif kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool) and value >= 0
    elif kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0
        value = float(value) if ok else value
    elif kind is Path:
        ok = isinstance(value, str) and bool(value)
        value = Path(value) if ok else value
    elif kind is str:
        ok = isinstance(value, str)
    elif origin is dict:
        ok = isinstance(value, dict)
    elif kind is list:
        ok = isinstance(value, list)
    elif origin is tuple:  # a list of strings in TOML, kept immutable
        ok = isinstance(value, list) and all(isinstance(v, str) and v for v in value)
        value = tuple(value) if ok else value
    else:  # pragma: no cover - every declared type is handled above
        ok = False
    if not ok:
        expected = {bool: "true or false", int: "a whole number ≥ 0",
                    float: "a number ≥ 0", Path: "a non-empty path",
                    str: "a string"}.get(kind, "a list of strings" if origin is tuple else "a table")
        raise ConfigError(f"{where}: expected {expected}, got {value!r}")
    return value


def _unknown(label: str, key: str, known: dict[str, Any]) -> str:
    close = difflib.get_close_matches(key, list(known), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"unknown setting {label}{hint}; known: {', '.join(sorted(known))}"


#: What SIGHUP can change without reloading the model, per section.
RELOADABLE = {
    "spool": ("settle_seconds", "poll_seconds", "claim_timeout", "max_active_jobs", "split_lines"),
    "engine": ("max_inflight",),
    "models": ("max_wait_seconds", "gpu_hour_price"),
    "limits": ("max_line_bytes", "max_file_bytes", "max_output_tokens_per_line"),
    "heartbeat": ("seconds",),
    "watchdog": ("stall_seconds", "restart_seconds"),
    "events": ("progress_seconds",),
}


def reload_settings(old: Config, new: Config) -> tuple[Config, list[str]]:
    """`old` with the reloadable settings of `new`; and the changed keys that need a restart."""
    sections = {}
    for name, keys in RELOADABLE.items():
        sections[name] = dataclasses.replace(getattr(old, name), **{k: getattr(getattr(new, name), k) for k in keys})
    merged = dataclasses.replace(old, **sections)
    needs_restart = [
        f"[{section.name}] {key.name}"
        for section in dataclasses.fields(Config)
        for key in dataclasses.fields(getattr(merged, section.name))
        if getattr(getattr(merged, section.name), key.name) != getattr(getattr(new, section.name), key.name)
    ]
    return merged, needs_restart

