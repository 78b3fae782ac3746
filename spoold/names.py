"""How a submitter's file name is shown: one line of printable text, whatever its bytes.

A drop's name is chosen by whoever can write the inbox, and it reaches
systemd's `STATUS=` field, the journal, events, heartbeats, terminals and
`spoold watch`. A newline there is a second sd_notify field (`WATCHDOG=trigger`
kills the service), bytes that are not UTF-8 cannot be sent at all, and
terminal escapes or bidi overrides make a person misread what runs. So the
name is shown in one display form, made once at claim: undecodable bytes as
`\\xNN`, control and format characters as `\\uNNNN`. The original name is
kept losslessly beside it (batch.json `drop.name`), for the daemon alone.
"""

from __future__ import annotations

import unicodedata

#: Unicode categories never shown as they are: controls (newline, escape),
#: format characters (bidi overrides, zero-width), line and paragraph separators.
_HIDDEN_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"})

#: A name longer than this is cut (a drop name is at most 255 bytes on Linux;
#: another host's record may say anything).
MAX_DISPLAY_CHARS = 300


def is_plain_name(name: object) -> bool:
    """Whether `name` (read from a record or a request) may name one entry of a spool directory: a
    non-empty string with no path in it, not hidden. A record is data, even one a daemon wrote."""
    return isinstance(name, str) and bool(name) and "/" not in name and not name.startswith(".")


def display_name(name: str) -> str:
    """`name` as one printable line: safe in STATUS=, logs, events, JSON and terminals.

    Names from `os.scandir` carry undecodable bytes as surrogate escapes
    (U+DC80..U+DCFF); they become `\\xNN`, as the bytes were. Applying it to
    a display form changes nothing, so a name read back from any record can
    always be passed through it again.
    """
    if name.isprintable() and len(name) <= MAX_DISPLAY_CHARS:
        return name  # the common case, cheaply
    shown = "".join(_shown(c) for c in name)
    if len(shown) > MAX_DISPLAY_CHARS:
        shown = shown[:MAX_DISPLAY_CHARS - 3] + "..."
    return shown


def _shown(c: str) -> str:
    code = ord(c)
    if 0xDC80 <= code <= 0xDCFF:  # a byte that was not UTF-8 (surrogateescape)
        return f"\\x{code - 0xDC00:02x}"
    if c == " " or unicodedata.category(c) not in _HIDDEN_CATEGORIES and c.isprintable():
        return c
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"
