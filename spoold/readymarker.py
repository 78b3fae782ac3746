"""The `NAME.jsonl.ready` marker beside a drop: the drop is whole, and what the batch asks for.

An empty marker only says the drop is complete (scp and NFS writers write in
place; the marker spares them `[spool] settle_seconds`). A marker may also
hold a JSON object, the batch's metadata as the OpenAI Batch API takes it:
`{"priority": "5"}` gives the job five times a default job's share of the
engine. `spoold submit --priority` writes one; rsync and scp users may too.

What a marker holds is a submitter's data: read only from a regular file
of the drop's owner (or root, or the daemon), at most MAX_MARKER_BYTES,
and checked by `check_metadata`. A marker that is wrong is reported in the
log, naming it and what is wrong, and the drop runs without its metadata:
a priority is never a reason to refuse work.
"""

from __future__ import annotations

import errno
import json
import logging
import os
from pathlib import Path

from .durable import fsync_dir, hidden_temp, rename_noreplace, write_all
from .jobrecord import check_metadata
from .names import display_name

log = logging.getLogger(__name__)

#: The marker of inbox/NAME is inbox/NAME + READY_SUFFIX.
READY_SUFFIX = ".ready"

#: Metadata is 16 short pairs; anything larger is not a marker spoold wrote.
MAX_MARKER_BYTES = 16 * 1024


def may_mark(marker_uid: int, drop_uid: int) -> bool:
    """Whether a marker made by `marker_uid` counts for a drop of `drop_uid`: the owner's, root's or the daemon's.

    Anyone who may write the inbox may create a marker: without this, one
    submitter could force-claim another's half-written file, or set its priority.
    """
    return marker_uid in (drop_uid, 0, os.geteuid())


def read_metadata(marker: Path, owner_uid: int, warn: bool = True) -> dict[str, str] | None:
    """The metadata in the marker `marker` of a drop owned by `owner_uid`; None when it holds none.

    None too (with a warning, unless `warn` is False: the scheduler's look
    before the claim, which warns once) when it cannot be read, was made by
    someone else, is too large or is not valid metadata.
    """
    from .validation import open_regular  # here, not above: validation loads numpy, which `spoold status` need not

    try:
        with open_regular(marker) as f:
            uid = os.fstat(f.fileno()).st_uid
            data = f.read(MAX_MARKER_BYTES + 1)
    except FileNotFoundError:
        return None
    except OSError as e:
        return _ignored(marker, f"cannot read it ({e.strerror or e})", warn)
    if not may_mark(uid, owner_uid):
        return _ignored(marker, f"made by uid {uid}, not by the drop's owner (uid {owner_uid})", warn)
    if not data.strip():
        return None
    if len(data) > MAX_MARKER_BYTES:
        return _ignored(marker, f"larger than {MAX_MARKER_BYTES} bytes", warn)
    try:
        return check_metadata(json.loads(data.decode()))
    except ValueError as e:  # json.JSONDecodeError and UnicodeDecodeError are ValueErrors
        return _ignored(marker, str(e), warn)
    except RecursionError:  # `[[[[...` fits in the size limit: not a ValueError, and it must not end the daemon
        return _ignored(marker, "its JSON is nested too deeply", warn)


def _ignored(marker: Path, why: str, warn: bool) -> None:
    if not warn:
        return None
    log.warning("inbox/%s: its metadata is ignored (%s); the drop runs with the default priority",
                display_name(marker.name), why)
    return None


def publish_with_metadata(tmp: Path, dest: Path, metadata: dict[str, str]) -> None:
    """Rename the finished drop `tmp` to `dest` with its marker already beside it.

    The marker goes first: a renamed drop is claimable at once, and a claim
    made before its marker existed would run without the metadata. Both
    renames refuse to replace (FileExistsError), and a marker whose drop
    could not take `dest` is removed again. A `dest` that exists already is
    refused before the marker is made: it would mark someone else's drop,
    perhaps half written, complete.
    """
    marker = dest.with_name(dest.name + READY_SUFFIX)
    if os.path.lexists(dest):
        raise FileExistsError(errno.EEXIST, "a drop of this name is in the inbox", str(dest))
    with hidden_temp(dest.parent, marker.name) as (fd, staged):
        write_all(fd, json.dumps(check_metadata(metadata)).encode() + b"\n")
    try:
        rename_noreplace(staged, marker)
    except BaseException:
        os.unlink(staged)
        raise
    try:
        rename_noreplace(tmp, dest)
    except BaseException:
        os.unlink(marker)
        raise
    fsync_dir(dest.parent)
