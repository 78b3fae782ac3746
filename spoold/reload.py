"""SIGHUP: read the config file again and keep what may change without a restart.

The daemon decides when (its loop acts on the signal its handler recorded)
and hands the new settings to its parts; this reads the file, merges the
reloadable keys (`config.RELOADABLE`), tells systemd (RELOADING=1, then
READY=1 once they are applied) and names in the log the changed keys that
need a restart. A file that no longer parses keeps the settings in use.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from .config import Config, ConfigError, reload_settings
from .notify import Notifier

log = logging.getLogger(__name__)


def apply_reload(current: Config, read: Callable[[], Config], apply: Callable[[Config], None],
                 notifier: Notifier) -> None:
    """Hand `apply` the settings to use from now on: `current` with the reloadable keys `read` gives.
    A file that is wrong is logged, and `current` stays."""
    notifier.reloading()
    try:
        config, needs_restart = reload_settings(current, read())
    except ConfigError as e:
        log.error("reload: %s; keeping the current settings", e)
    else:
        apply(config)
        log.info("reloaded settings (max_inflight applies to the jobs started from now on)")
        if needs_restart:
            log.warning("reload: %s changed; restart spoold to apply", ", ".join(needs_restart))
    notifier.send("READY=1")
