"""Media a line would have the engine fetch: data: URLs only, and http(s) from hosts the operator allows.

vLLM fetches the `image_url` (and `video_url`, `audio_url`, `file_url`) a
chat, responses, embedding or score line names, from the GPU box, following
redirects. So a submitter could make the box request its cloud metadata
(169.254.169.254), an internal service or anything else it can reach, and
read the answer back through the model (SSRF). A line naming such a URL gets
an error before it reaches the engine, unless `[limits]
allowed_media_domains` lists its host; media sent inline as a `data:` URL is
always fine. The URL is parsed as vLLM parses it (urllib3's parse_url), so
what is checked is what would be fetched.

Leaf module.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

#: Content-part keys whose value (a string, or an object's `url`) vLLM loads as media.
URL_KEYS = frozenset({"image_url", "video_url", "audio_url", "file_url"})


def may_name_media(raw: bytes) -> bool:
    """Whether a raw line could hold a media URL at all: a key ending `_url` (every line has a `url`),
    or an escape that could spell one. Most lines have neither, and skip the walk."""
    return b"_url" in raw or b"\\u" in raw


def refused_media(body: Any, allowed: Iterable[str]) -> str | None:
    """Why the first media URL of `body` may not be fetched (its field path and what to do), or None."""
    allowed = frozenset(allowed)
    for where, url in _media_urls(body, "body"):
        why = _why_refused(url, allowed)
        if why:
            return f"`{where}` {why}"
    return None


def _media_urls(node: Any, path: str) -> Iterator[tuple[str, str]]:
    """(field path, URL) of every media URL anywhere in `node`: content parts may nest (score documents)."""
    if isinstance(node, dict):
        for key, value in node.items():
            where = f"{path}.{key}"
            url = value.get("url") if isinstance(value, dict) else value
            if key in URL_KEYS and isinstance(url, str):
                yield (f"{where}.url" if isinstance(value, dict) else where), url
            else:
                yield from _media_urls(value, where)
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _media_urls(value, f"{path}[{i}]")


def _why_refused(url: str, allowed: frozenset[str]) -> str | None:
    if url[:5].lower() == "data:":  # inline: nothing is fetched (vLLM's own test)
        return None
    from urllib3.exceptions import LocationParseError
    from urllib3.util import parse_url

    try:
        parsed = parse_url(url)
    except LocationParseError:
        return "is not a URL vLLM can read; send the media inline as a data: URL"
    if parsed.scheme and parsed.scheme.startswith("http"):
        if allowed and parsed.hostname in allowed:
            return None
        return (f"asks the engine to fetch from {parsed.hostname or 'a URL without a host'}: a line may not "
                "make spoold connect anywhere; send the media inline as a data: URL, or ask the operator to "
                "list the host in [limits] allowed_media_domains")
    return ("is not a data: URL: only media sent inline (or fetched over http(s) from a host in [limits] "
            "allowed_media_domains) is accepted")
