"""Which job a person means when the name they typed names none: a hint, never an action.

People know the file they submitted (`scores.jsonl`), not the id its job was
given when a daemon claimed it (`scores-20261206T132548-a725bfbe3bca02a4`),
and `spoold submit` cannot tell them that id: the claim comes later. So when
`spoold cancel`, `retry` or `results` finds no job by the name typed, they
say where that name is instead: the jobs made from drops of that name, with
the state of each (running, finished, failed whole), or the one state of the
job id typed, or that the drop is still queued and has no id yet. The next
command is one copy away. It only reads directory names; it never picks a
job for the person, as a guess could cancel the wrong one of two runs of a
daily `scores.jsonl`.
"""

from __future__ import annotations

from pathlib import Path

from .groups import Groups
from .spool import Spool, copy_name, is_drop_name, job_ids_of, subdirs

#: At most this many suggestions are listed (newest first), then how many more there are.
MAX_SHOWN = 5


def hint(spool: Spool, typed: str) -> str | None:
    """One line saying where the job `typed` names is, or which jobs came from a drop of that name;
    None when the spool has nothing by that name."""
    places = _places(spool)
    if typed in places:
        return f"{typed} is {places[typed]}"
    name = Path(typed).name  # a path to the file submitted: its name is what the job id was made from
    if not name:
        return None
    if name in places:  # a path to the job's directory, as a shell completes it
        return f"{name} is {places[name]}: name it by its id alone, without the directory"
    said = [s for s in (_jobs_from_drop(places, name), _queued(spool, name)) if s]
    return "; ".join(said) or None


def _jobs_from_drop(places: dict[str, str], name: str) -> str | None:
    """Submitted twice while the first waited, a file's second drop is `scores-2.jsonl`: the person still
    calls both `scores.jsonl`, so the copies' jobs are listed too, and said to be copies."""
    wanted = job_ids_of(name, with_copies=True)
    found = sorted(((m.group(1), job_id) for job_id in places if (m := wanted.fullmatch(job_id))), reverse=True)
    shown = [f"{job_id} ({places[job_id]})" for _, job_id in found[:MAX_SHOWN]]  # newest first: stamps sort as time
    if len(found) > MAX_SHOWN:
        shown.append(f"and {len(found) - MAX_SHOWN} older")
    exact = job_ids_of(name)
    named = name if all(exact.fullmatch(job_id) for _, job_id in found) else \
        f"{name} (or {copy_name(name, 2)}, ..., as `spoold submit` names another while one waits)"
    if len(found) == 1:
        return f"the job from a drop named {named}: {shown[0]}"
    return f"jobs from drops named {named}, newest first: {', '.join(shown)}" if found else None


def _queued(spool: Spool, name: str) -> str | None:
    try:
        queued = is_drop_name(name) and (spool.inbox / name).is_file()
    except PermissionError:  # an inbox this user may not look into: not said
        return None
    if not queued:
        return None
    return f"{name} is queued in {spool.inbox}/, not claimed yet: it has no job id until a daemon claims it"


def _places(spool: Spool) -> dict[str, str]:
    """Every job id in the spool this user may see, with where it is in words (a job is in one place;
    a later place wins)."""
    places: dict[str, str] = {}
    for host in _dirs(spool.processing):
        places.update((job.name, f"running on {host.name}") for job in _dirs(host))
    places.update((group.name, "running, split across daemons") for group in _dirs(Groups(spool).root))
    places.update((job.name, "finished, in outbox/") for job in _dirs(spool.outbox))
    places.update((job.name, "failed whole, in failed/: `spoold status` says why") for job in _dirs(spool.failed))
    return places


def _dirs(parent: Path) -> list[Path]:
    """The directories in `parent`; none where this user may not look (outside the spool's group)."""
    try:
        return subdirs(parent)
    except PermissionError:
        return []
