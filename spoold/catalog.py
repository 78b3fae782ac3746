"""`spoold models`: the configured models as a person sees them.

Each alias, what it resolves to, the engine settings of its own, and which
daemons sharing the spool have it loaded right now (from their heartbeats).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .config import Config, engine_settings_for
from .heartbeat import host_beats
from .lifecycle import NOT_SERVING

#: Said under the table when the daemons' heartbeats were not readable (a user outside the spool's group).
UNREADABLE_BEATS = ("where models are loaded is in processing/, which this user may not read (run as root, or as "
                    "a member of the spool's group, [spool] group, to see it)")


def model_rows(config: Config) -> list[dict[str, Any]]:
    """One row per configured model: names, resolution, own settings, where loaded (`loaded_on` is None
    where this user may not read the daemons' heartbeats: unknown, not nowhere)."""
    loaded = _loaded_on(Path(config.spool.root) / "processing", config.heartbeat.seconds)
    default = config.models.aliases.get(config.engine.model, config.engine.model)
    by_model: dict[str, list[str]] = {}
    for alias, model in config.models.aliases.items():
        by_model.setdefault(model, []).append(alias)
    if default and default not in by_model:
        by_model[default] = []
    rows = []
    for model, aliases in by_model.items():
        settings = engine_settings_for(config, model)
        rows.append({"names": aliases, "model": model, "default": model == default,
                     "settings": config.models.settings.get(model, {}),
                     "max_model_len": settings.max_model_len or None,
                     "loaded_on": None if loaded is None else loaded.get(model, [])})
    return rows


def render(rows: list[dict[str, Any]]) -> str:
    """A plain table for the terminal."""
    lines = [f"{'NAMES':30} {'MODEL':50} {'LOADED ON':20} SETTINGS"]
    for r in rows:
        names = ", ".join(r["names"]) or "-"
        if r["default"]:
            names += " (default)"
        settings = ", ".join(f"{k}={v}" for k, v in r["settings"].items()) or "-"
        loaded_on = "?" if r["loaded_on"] is None else ", ".join(r["loaded_on"]) or "-"
        lines.append(f"{names:30} {r['model']:50} {loaded_on:20} {settings}")
    if any(r["loaded_on"] is None for r in rows):
        lines.append(f"LOADED ON ?: {UNREADABLE_BEATS}")
    return "\n".join(lines)


def _loaded_on(processing: Path, beat_seconds: float) -> dict[str, list[str]] | None:
    """model → hosts still beating that have it loaded (a stopped daemon's last beat says `stopping`);
    None where this user may not look into processing/."""
    try:
        beats = host_beats(processing, beat_seconds)
    except PermissionError:
        return None
    loaded: dict[str, list[str]] = {}
    for beat in beats:
        if beat.beating and beat.model and beat.state not in NOT_SERVING:
            loaded.setdefault(beat.model, []).append(beat.host)
    return loaded
