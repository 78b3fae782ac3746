"""Signed webhooks when a job ends: deliveries kept in the spool, sent and retried by the daemon.

Just before a finished job is published (to outbox/ or failed/), its
delivery is written, fsynced, to `webhooks/<host>/<event-id>.json`, so a
crash can never publish a job without one. The daemon's sender posts each
delivery to `[webhooks] url` as OpenAI sends its events (`{"object":
"event", "id", "type": "batch.completed", "created_at", "data": {"id"}}`),
signed per Standard Webhooks (`webhook-id`, `webhook-timestamp`,
`webhook-signature`) with the `standardwebhooks` package, so `openai`'s
`client.webhooks.unwrap()` verifies it. A delivery is retried with
exponential backoff and jitter until a 2xx answer or `max_age_seconds`
(then it is kept in `given_up/`), always with the same `webhook-id`, so a
receiver can drop repeats. Only the operator's config names a URL:
nothing a submitter writes makes spoold connect anywhere. A delivery is
sent only once its job is in outbox/ or failed/, and holds no prompt,
response or key: only the job's id. A host whose heartbeat stops for
`[spool] claim_timeout` has its waiting deliveries taken over by another
daemon on the spool, as its jobs are.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from standardwebhooks.webhooks import Webhook

from .backoff import backoff_seconds
from .config import ConfigError, WebhooksSettings
from .durable import atomic_write_json, durable_mkdir, durable_rename, fsync_dir
from .jobrecord import JobRecord
from .spool import JobDir, PeerClocks, PublishHook, file_signature, subdirs

if TYPE_CHECKING:
    import httpx

log = logging.getLogger(__name__)

#: The first retry waits about this long; each next one twice as long (with jitter), up to MAX_BACKOFF_SECONDS.
FIRST_BACKOFF_SECONDS = 1.0
MAX_BACKOFF_SECONDS = 3600.0
#: A shorter signing key could be guessed.
MIN_SECRET_BYTES = 16
#: The sender looks for new deliveries at least this often (a job's end also wakes it at once).
POLL_SECONDS = 5.0
#: `webhooks/<this>/`: deliveries of batches no daemon ran (withdrawn through the API before a claim),
#: written by the API server; the first sender to rename one into its own directory sends it.
UNCLAIMED = ".unclaimed"


@dataclass
class Delivery:
    """One event to deliver, and how its tries went."""

    id: str  # the event's id, also its `webhook-id` on every try
    type: str  # batch.completed, batch.failed, batch.cancelled, batch.expired
    created_at: int
    job_id: str
    #: the job's tenant (an API key's name, "" for a drop): whose receiver gets it
    tenant: str = ""
    #: sent once the job is in outbox/ or failed/; False for a batch withdrawn before any daemon ran it
    waits_for_job: bool = True
    attempts: int = 0
    next_attempt_at: float = 0.0
    last_error: str | None = None

    def body(self) -> str:
        """The event as OpenAI sends it."""
        return json.dumps({"object": "event", "id": self.id, "type": self.type, "created_at": self.created_at,
                           "data": {"id": self.job_id}})


def event_id(job_id: str, event_type: str) -> str:
    """The same id for the same end of the same job: a job finished again after a crash re-records, not adds."""
    return "evt_" + hashlib.sha256(f"{job_id}\0{event_type}".encode()).hexdigest()[:24]


def read_secrets(settings: WebhooksSettings) -> dict[str, str]:
    """Tenant ("" for the `[webhooks]` receiver) -> its signing secret, for every receiver the config names."""
    secrets = {"": read_secret(settings.secret_file)} if settings.url else {}
    for name, tenant in settings.tenants.items():
        secrets[name] = read_secret(tenant.secret_file, f"[webhooks.{name}]")
    return secrets


def read_secret(path: str, table: str = "[webhooks]") -> str:
    """The signing secret (`whsec_` and base64, as OpenAI issues them) from `secret_file` of `table`."""
    try:
        secret = Path(path).read_text().strip()
    except OSError as e:
        raise ConfigError(f"{table} secret_file {path}: cannot read: {e.strerror}") from None
    try:
        key = base64.b64decode(secret.removeprefix("whsec_"), validate=True) if secret.startswith("whsec_") else b""
    except binascii.Error:
        key = b""
    if len(key) < MIN_SECRET_BYTES:
        raise ConfigError(f"{table} secret_file {path}: expected whsec_ and at least {MIN_SECRET_BYTES} "
                          "bytes in base64; make one with: echo whsec_$(openssl rand -base64 32)")
    return secret


class Deliveries:
    """This host's deliveries in the spool: recorded when a job ends, removed when sent."""

    def __init__(self, root: Path, host_id: str, file_mode: int = 0o640) -> None:
        self.dir = Path(root) / "webhooks" / host_id
        self.given_up = self.dir / "given_up"
        self.file_mode = file_mode

    def record(self, job_id: str, status: str, tenant: str = "", waits_for_job: bool = True) -> Delivery:
        """Write the delivery of a job's end durably (before the job is published)."""
        event_type = f"batch.{status}"
        delivery = Delivery(event_id(job_id, event_type), event_type, int(time.time()), job_id, tenant,
                            waits_for_job)
        durable_mkdir(self.dir)
        atomic_write_json(self.dir / f"{delivery.id}.json", asdict(delivery), self.file_mode)
        return delivery

    def pending(self) -> list[Delivery]:
        """Every delivery not yet sent or given up, oldest first; an unreadable one is left for a person."""
        found = []
        for path in self.dir.glob("evt_*.json"):
            try:
                found.append(Delivery(**json.loads(path.read_text())))
            except (OSError, ValueError, TypeError) as e:
                log.warning("webhook delivery %s unreadable (%s); left alone", path.name, e)
        return sorted(found, key=lambda d: (d.created_at, d.id))

    def save(self, delivery: Delivery) -> bool:
        """Keep a try's outcome, so a restart waits as long as this process would have. False (and nothing
        written) when the delivery is no longer this host's: another host took it over while this one
        was silent, and sends it from now on."""
        path = self.dir / f"{delivery.id}.json"
        if not path.exists():
            log.warning("webhook %s was taken over by another host; this one no longer sends it", delivery.id)
            return False
        atomic_write_json(path, asdict(delivery), self.file_mode)
        return True

    def sent(self, delivery: Delivery) -> None:
        """A 2xx came back: the delivery is done."""
        self._remove(delivery)

    def withdraw(self, delivery: Delivery) -> None:
        """Recorded for a publish that another host made first: that host's delivery is the one sent."""
        self._remove(delivery)

    def _remove(self, delivery: Delivery) -> None:
        (self.dir / f"{delivery.id}.json").unlink(missing_ok=True)
        fsync_dir(self.dir)

    def give_up(self, delivery: Delivery) -> None:
        """Past `max_age_seconds`: kept in given_up/ for a person to see, never sent again."""
        if not self.save(delivery):
            return
        durable_mkdir(self.given_up)
        durable_rename(self.dir / f"{delivery.id}.json", self.given_up / f"{delivery.id}.json")

    def adopt_unclaimed(self) -> None:
        """Take over the deliveries the API server left for any daemon (UNCLAIMED)."""
        self._adopt(self.dir.parent / UNCLAIMED)

    def adopt_from_silent_hosts(self, claim_timeout: float, clocks: PeerClocks, now: float | None = None) -> list[str]:
        """Take over the deliveries of every other host whose `processing/<host>/heartbeat.json` has not
        changed for `claim_timeout` (as its jobs are taken over): a dead host's receivers still hear of
        its jobs. Returns the hosts taken from. Timed by `clocks` on this host's monotonic clock, so no
        peer's clock decides; a host that comes back sends none of them again (`save` sees them gone)."""
        now = time.monotonic() if now is None else now
        taken = []
        for peer in subdirs(self.dir.parent):
            if peer == self.dir or not any(peer.glob("evt_*.json")):
                continue
            beat = self.dir.parent.parent / "processing" / peer.name / "heartbeat.json"
            if clocks.silent_for(beat, file_signature(beat), now) > claim_timeout and self._adopt(peer):
                log.warning("took over the webhook deliveries of host %s: its heartbeat has not changed for "
                            "%.0fs", peer.name, claim_timeout)
                taken.append(peer.name)
        return taken

    def _adopt(self, source: Path) -> int:
        """Move `source`'s waiting deliveries into this host's directory, as they are (same id, same tries):
        one rename each decides which daemon sends it. How many were taken."""
        taken = 0
        for path in source.glob("evt_*.json"):
            durable_mkdir(self.dir)
            try:
                os.rename(path, self.dir / path.name)
            except FileNotFoundError:
                continue  # another daemon took it
            fsync_dir(self.dir)
            fsync_dir(source)
            taken += 1
        return taken

    def counts(self) -> dict[str, int]:
        """How many deliveries wait and how many were given up (for `spoold status`)."""
        return {"pending": len(list(self.dir.glob("evt_*.json"))),
                "given_up": len(list(self.given_up.glob("evt_*.json")))}


class WebhookSender:
    """Posts this host's deliveries, signed, and retries them until a 2xx or they are too old.

    `secrets` (read_secrets) says which receivers there are: a tenant's own
    (`[webhooks.NAME]`), else the `[webhooks]` one.
    """

    def __init__(self, deliveries: Deliveries, settings: WebhooksSettings, secrets: dict[str, str],
                 published: Callable[[str], bool], tell: Callable[[str, dict[str, Any]], None],
                 claim_timeout: float | None = None) -> None:
        self.deliveries = deliveries
        #: `[spool] claim_timeout`: a silent host's deliveries are taken over after it (None: never)
        self.claim_timeout = claim_timeout
        self._peer_clocks = PeerClocks()
        self.timeout, self.max_age = settings.timeout_seconds, settings.max_age_seconds
        #: tenant -> (url, signer); "" is the receiver of drops and of tenants without one of their own
        self.receivers = {tenant: (settings.tenants[tenant].url if tenant else settings.url, Webhook(secret))
                          for tenant, secret in secrets.items()}
        #: whether a job is in outbox/ or failed/ yet: a delivery waits for its job
        self.published = published
        #: (topic, fields): the feed and the metrics hear of each delivery and each failed try
        self.tell = tell
        self.wake = asyncio.Event()

    async def run(self) -> None:
        """Send what is due, then sleep until the next is due or a job's end wakes it; forever."""
        import httpx  # here, not at import: `spoold status` reads deliveries and sends none

        async with httpx.AsyncClient(timeout=self.timeout, follow_redirects=False) as client:
            while True:
                due = []  # when the next tries of published jobs' deliveries are due
                await asyncio.to_thread(self.adopt)
                for delivery in await asyncio.to_thread(self.deliveries.pending):
                    if delivery.waits_for_job and not self.published(delivery.job_id):
                        continue  # its job's rename wakes us (or the next poll sees it)
                    if delivery.next_attempt_at > time.time() or not await self.attempt(client, delivery):
                        due.append(delivery.next_attempt_at)
                wait = min([POLL_SECONDS, *(max(0.0, t - time.time()) for t in due)])
                try:
                    await asyncio.wait_for(self.wake.wait(), timeout=max(wait, 0.05))
                except asyncio.TimeoutError:
                    pass
                self.wake.clear()

    def adopt(self) -> None:
        """Take over the deliveries nobody else will send: the API server's, and silent hosts'."""
        self.deliveries.adopt_unclaimed()
        if self.claim_timeout is not None:
            self.deliveries.adopt_from_silent_hosts(self.claim_timeout, self._peer_clocks)

    async def attempt(self, client: httpx.AsyncClient, delivery: Delivery) -> bool:
        """One try; whether the delivery is done with (delivered, or given up). Its outcome is written
        before the next try is due."""
        delivery.attempts += 1
        receiver = self.receivers.get(delivery.tenant) or self.receivers.get("")
        if receiver is None:  # the config lost the tenant's receiver since the job ended
            error = f"no receiver for tenant {delivery.tenant!r}: neither [webhooks.{delivery.tenant}] nor [webhooks] url"
        else:
            error = await self._post(client, delivery, *receiver)
        fields = {"event": delivery.id, "type": delivery.type, "job": delivery.job_id,
                  "attempts": delivery.attempts}
        if error is None:
            await asyncio.to_thread(self.deliveries.sent, delivery)
            log.info("webhook %s (%s of job %s) delivered after %d try(s)", delivery.id, delivery.type,
                     delivery.job_id, delivery.attempts)
            self.tell("spoold.webhook.delivered", fields)
            return True
        delivery.last_error = error
        given_up = time.time() - delivery.created_at >= self.max_age
        delivery.next_attempt_at = time.time() + backoff(delivery.attempts)
        await asyncio.to_thread(self.deliveries.give_up if given_up else self.deliveries.save, delivery)
        log.warning("webhook %s (%s of job %s) try %d failed: %s; %s", delivery.id, delivery.type,
                    delivery.job_id, delivery.attempts, error,
                    "given up: older than [webhooks] max_age_seconds" if given_up
                    else f"next try in {delivery.next_attempt_at - time.time():.1f}s")
        self.tell("spoold.webhook.failed", {**fields, "error": error, "given_up": given_up})
        return given_up

    @staticmethod
    async def _post(client: httpx.AsyncClient, delivery: Delivery, url: str, signer: Webhook) -> str | None:
        """Post the delivery once, signed; None on a 2xx, else what went wrong."""
        import httpx
        body = delivery.body()
        now = datetime.now(tz=timezone.utc)
        headers = {"content-type": "application/json", "webhook-id": delivery.id,
                   "webhook-timestamp": str(int(now.timestamp())),
                   "webhook-signature": signer.sign(delivery.id, now, body)}
        try:
            answer = await client.post(url, content=body, headers=headers)
        except httpx.HTTPError as e:
            return f"{type(e).__name__}: {e}"[:200]
        return None if 200 <= answer.status_code < 300 else f"HTTP {answer.status_code}"


def backoff(attempts: int) -> float:
    """Seconds before the next try after `attempts` failed ones (backoff.py: doubling, capped, jittered)."""
    return backoff_seconds(attempts, FIRST_BACKOFF_SECONDS, MAX_BACKOFF_SECONDS)


def record_end(deliveries: Deliveries, secrets: dict[str, str]) -> PublishHook:
    """`Spool.before_publish` for a daemon with webhooks: record the delivery of the job's end (its status),
    when its tenant or `[webhooks]` has a receiver (`secrets`, as read_secrets gives them). Returns how to
    withdraw it, for an assembly that another host published first (it recorded its own)."""
    def record(job: JobDir) -> Callable[[], None] | None:
        ended, _ = JobRecord.load(job.batch)
        tenant = ended.tenant if ended is not None else ""
        if tenant not in secrets and "" not in secrets:
            return None
        delivery = deliveries.record(job.id, ended.status if ended is not None else "failed", tenant)
        return lambda: deliveries.withdraw(delivery)
    return record


def record_withdrawn(root: Path, settings: WebhooksSettings,
                     file_mode: int = 0o640) -> Callable[[str, str], None] | None:
    """For the API server: record `batch.cancelled` of a batch (id, tenant) it withdrew before any daemon
    claimed it, in UNCLAIMED for a daemon to send; None when no receiver would get it (no webhooks)."""
    if not settings.url and not settings.tenants:
        return None
    unclaimed = Deliveries(root, UNCLAIMED, file_mode)

    def record(batch_id: str, tenant: str) -> None:
        if settings.url or tenant in settings.tenants:
            unclaimed.record(batch_id, "cancelled", tenant, waits_for_job=False)
    return record


def job_published(root: Path) -> Callable[[str], bool]:
    """Whether a job is in `root`'s outbox/ or failed/ (a delivery is sent only then)."""
    root = Path(root)
    return lambda job_id: (root / "outbox" / job_id).is_dir() or (root / "failed" / job_id).is_dir()

