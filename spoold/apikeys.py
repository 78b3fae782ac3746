"""Who may use the HTTP API: `[api] keys_file`, one `NAME:KEY[:admin]` per line.

Each key is a tenant, named NAME: what it uploads and creates is its own,
and another key gets 404 for it. `admin` keys also see batches dropped
straight into the inbox. Keys are compared in constant time and never
logged; a bad line stops the API at start (or keeps the old keys on
SIGHUP) with an error naming the file and the line, never the key.
A leaf module: nothing of the daemon is imported here.
"""

from __future__ import annotations

import hmac
import re
from dataclasses import dataclass
from pathlib import Path

#: A tenant's name: it is stored in records and shown in logs, so plain.
NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
#: The one tenant of an API that listens on loopback without a keys file.
LOCAL = "local"
#: A key shorter than this is refused: it could be guessed.
MIN_KEY_CHARS = 16


class KeysError(Exception):
    """The keys file is missing, unreadable or has a bad line; the message says which (never the key)."""


@dataclass(frozen=True)
class Tenant:
    """Whoever a request's key belongs to."""

    name: str
    admin: bool = False


class ApiKeys:
    """The keys the API accepts, each with its tenant."""

    def __init__(self, keys: dict[str, Tenant]) -> None:
        self._keys = [(key.encode(), tenant) for key, tenant in keys.items()]

    def __len__(self) -> int:
        return len(self._keys)

    def tenant(self, presented: str | None) -> Tenant | None:
        """The tenant of `presented`, or None; every key is compared, so timing tells nothing."""
        if not presented:
            return None
        given, found = presented.encode("utf-8", "surrogateescape"), None
        for key, tenant in self._keys:
            if hmac.compare_digest(key, given):
                found = tenant
        return found


def read_keys(path: str | Path) -> ApiKeys:
    """Parse the keys file; raises KeysError naming the file and line of anything wrong."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise KeysError(f"{path}: no such keys file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise KeysError(f"{path}: cannot read: {getattr(e, 'strerror', None) or e}") from None
    keys: dict[str, Tenant] = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, key, admin = _parse_line(f"{path} line {number}", line)
        if key in keys:
            raise KeysError(f"{path} line {number}: this key is already given to {keys[key].name!r}")
        keys[key] = Tenant(name, admin)
    if not keys:
        raise KeysError(f"{path}: no keys (write one `NAME:KEY` per line)")
    return ApiKeys(keys)


def _parse_line(where: str, line: str) -> tuple[str, str, bool]:
    parts = line.split(":")
    if len(parts) not in (2, 3) or (len(parts) == 3 and parts[2] != "admin"):
        raise KeysError(f"{where}: expected NAME:KEY or NAME:KEY:admin")
    name, key = parts[0], parts[1]
    if not NAME.fullmatch(name):
        raise KeysError(f"{where}: the name must be 1-64 letters, digits, '_', '.' or '-'")
    if len(key) < MIN_KEY_CHARS or any(c.isspace() for c in key):
        raise KeysError(f"{where}: the key must be at least {MIN_KEY_CHARS} characters with no spaces "
                        "(e.g. `openssl rand -hex 24`)")
    return name, key, len(parts) == 3
