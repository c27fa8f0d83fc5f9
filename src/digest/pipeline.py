"""The use cases. The one module that wires the stages together.

The CLI, the scheduler and the web app call only what is here. Each use case reads from the
store, runs pure stages, and writes one status change back; a draft's status drives the flow.
"""

from __future__ import annotations

import hashlib
import importlib
import logging
import secrets
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import requests

from digest import approval, clock, drafting, tokens
from digest.config import Delivery, Settings
from digest.delivery.providers.base import Provider, check_with_retries
from digest.delivery.providers.registry import build_provider
from digest.delivery.sender import Sender, SendSummary, share_of
from digest.errors import DeliveryError, DigestError, DraftBusyError, DraftError, StoreError, TokenError
from digest.http import build_session
from digest.render.cache import render_key
from digest.render.fill import CompiledEmail, personalize
from digest.store import Store, open_store
from digest.store.store import (
    CollectStats,
    DraftSummary,
    ReasonCount,
    ReplaySeen,
    SendHold,
    SourceStatus,
    SuppressionRules,
    UncertainMessage,
)
from digest.types import CollectResult, DeliveryEvent, Draft, OutgoingMessage, Recipient

if TYPE_CHECKING:  # the lazily loaded names below, for type checkers
    from digest import subscribers as subscribers
    from digest.scheduler import next_run as next_run
    from digest.scheduler import previous_run as previous_run
    from digest.sources.registry import build_comment_sources as build_comment_sources
    from digest.sources.registry import build_source as build_source
    from digest.sources.registry import comment_blocks as comment_blocks

log = logging.getLogger(__name__)

# Imported on first use, not with this module: a `digest send` (and every process that only
# sends) never collects, drafts or adds subscribers, so it need not load APScheduler (cron
# schedules), the source modules with their feed and Markdown parsers, or email-validator
# (subscriber addresses). Nor does it compile (see compile_for), so the renderer (Jinja2,
# MRML, the sanitizer) and the ranking that uses the sanitizer are imported where a draft is
# made or compiled. The names stay reachable as attributes of this module.
_LAZY: dict[str, tuple[str, str | None]] = {
    "subscribers": ("digest.subscribers", None),
    "next_run": ("digest.scheduler", "next_run"),
    "previous_run": ("digest.scheduler", "previous_run"),
    "build_source": ("digest.sources.registry", "build_source"),
    "build_comment_sources": ("digest.sources.registry", "build_comment_sources"),
    "comment_blocks": ("digest.sources.registry", "comment_blocks"),
}


def __getattr__(name: str) -> Any:
    try:
        module, attr = _LAZY[name]
    except KeyError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    loaded = importlib.import_module(module)
    return loaded if attr is None else getattr(loaded, attr)


class App:
    """Settings, the store and lazily built clients, for one process."""

    def __init__(self, settings: Settings, store: Store, now: Callable[[], datetime] = clock.now) -> None:
        self.settings = settings
        self.store = store
        self.now = now
        self._session: requests.Session | None = None
        self._provider: Provider | None = None
        self._secret: str | None = None
        self._link_pair: Callable[[int, str], tuple[str, str]] | None = None

    @classmethod
    def open(cls, settings: Settings, now: Callable[[], datetime] = clock.now) -> App:
        return cls(settings, open_store(settings.database.url), now)

    @property
    def session(self) -> requests.Session:
        if self._session is None:
            self._session = build_session()
        return self._session

    @property
    def provider(self) -> Provider:
        if self._provider is None:
            provider = build_provider(self._delivery_settings(), build_session(pool_size=4))
            provider.from_addr = self.settings.newsletter.from_  # for `digest check`
            if provider.idempotent:  # its keys carry this installation's tag (Provider.installation)
                provider.installation = installation_tag(self.store.installation_id())
            self._provider = provider
        return self._provider

    def _delivery_settings(self) -> Delivery:
        # With several sender processes, each one's provider paces its share of the rate.
        delivery = share_of(self.settings).delivery
        if delivery.provider == "outbox":
            return delivery.model_copy(update={"outbox_dir": str(self.settings.resolve(delivery.outbox_dir))})
        return delivery

    @property
    def secret(self) -> str:
        """The key that signs links: ``web.secret_key``, else one kept in the database."""
        if self._secret is None:
            self._secret = self.settings.web.secret_key or self.store.secret()
        return self._secret

    @property
    def templates_dir(self) -> str | None:
        return str(self.settings.resolve(self.settings.templates)) if self.settings.templates else None

    def links(self, recipient: Recipient) -> tuple[str, str]:
        """A recipient's unsubscribe and preferences URLs (signed, purpose-bound)."""
        return self.link_pair(recipient.subscriber_id, recipient.email)

    @property
    def link_pair(self) -> Callable[[int, str], tuple[str, str]]:
        """:meth:`links` by subscriber id and address: the sender's per-message call."""
        if self._link_pair is None:
            self._link_pair = _link_maker(self.settings.newsletter.public_url, self.secret)
        return self._link_pair

    def close(self) -> None:
        if self._provider is not None:
            self._provider.close()
        if self._session is not None:
            self._session.close()
        self.store.close()


# -- collect ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class CollectOutcome:
    """One source's collect: what changed, or why it failed."""

    source: str
    stats: CollectStats
    error: str | None = None
    not_modified: bool = False
    warnings: tuple[str, ...] = ()


def collect(app: App) -> list[CollectOutcome]:
    """Fetch every source, then each essay source's comment sources over its recent essays.

    A failing source is recorded and the others go on (rule 8).
    """
    from digest.sources.registry import build_comment_sources, build_source

    outcomes = []
    for block in app.settings.sources:
        now = app.now()
        source = build_source(block, app.session)
        result = source.collect(app.store.cursor(source.name), now)
        outcomes.append(_record(app, result, now))
        for comment_source in build_comment_sources(block, app.session):
            now = app.now()
            cfg = comment_source.config
            essays = app.store.recent_essays(source.name, now - timedelta(days=cfg.lookback_days),
                                             cfg.max_essays)
            outcomes.append(_record(app, comment_source.collect_for(essays, now), now))
    return outcomes


def _record(app: App, result: CollectResult, now: datetime) -> CollectOutcome:
    """Store one source's result. If the store refuses it (something in it the database cannot
    hold), that is this source's failure, recorded as its error, and the other sources are still
    collected (rule 8); its cursor is not saved, so the next run fetches it all again. A database
    that cannot even record that stops the collect (the next source could not be recorded either)."""
    try:
        stats = app.store.record_collect(result, now)
    except StoreError as exc:
        error = f"could not store what was fetched: {exc}"
        app.store.record_collect(CollectResult(result.source, error=error), now)
        log.warning("source %s failed: %s", result.source, error)
        return CollectOutcome(result.source, CollectStats(), error, warnings=result.warnings)
    if result.error:
        log.warning("source %s failed: %s", result.source, result.error)
    for warning in result.warnings:
        log.warning("source %s: %s", result.source, warning)
    return CollectOutcome(result.source, stats, result.error, result.not_modified, result.warnings)


# -- draft -----------------------------------------------------------------------------------


def period_key(settings: Settings, now: datetime) -> str:
    """The digest period ``now`` falls in: the latest scheduled time at or before it."""
    from digest.scheduler import previous_run

    tz = settings.newsletter.tz
    last = previous_run(settings.digest.schedule, settings.newsletter.timezone, now)
    when = (last or now).astimezone(tz)
    return when.strftime("%Y-%m-%dT%H:%M")


@dataclass(frozen=True)
class DraftOutcome:
    """What ``make_draft`` did."""

    draft: Draft | None
    created: bool
    message: str
    notified: tuple[str, ...] = ()
    notify_error: str | None = None


def make_draft(app: App) -> DraftOutcome:
    """Compose the period's draft, if there is anything new, and ask the approvers to review it.

    Every run is recorded (the service's, `digest draft`'s, `digest run`'s), for
    :func:`missed_draft_run`.
    """
    now = app.now()
    outcome = _make_draft(app, now)
    try:
        app.store.record_run("draft", now)
    except DigestError as exc:  # the draft is made and the approvers told: that stands
        log.warning("draft: could not record this run (a restart may run it again, harmlessly): %s", exc)
    return outcome


def missed_draft_run(app: App) -> datetime | None:
    """The draft schedule's latest time, if no draft run has happened since it (the service
    was down then); else ``None``. `digest serve` then drafts at start, as anacron would.

    Since when: the last recorded run; on a database from before runs were recorded, the
    newest draft's creation. A database with neither has never drafted: a new install, whose
    first draft is the schedule's, not one at the service's first start (with nothing to say
    when it was installed, no scheduled time can be said to have been missed).
    """
    from digest.scheduler import previous_run

    due = previous_run(app.settings.digest.schedule, app.settings.newsletter.timezone, app.now())
    if due is None:
        return None
    since = app.store.last_run("draft")
    if since is None:
        newest = app.store.list_drafts(limit=1)
        since = newest[0].created_at if newest else None
    return due if since is not None and since < due else None


def apply_deadlines(app: App, now: datetime) -> list[tuple[int, str]]:
    """Skip or approve the drafts left unreviewed past ``digest.approval.deadline``. Each draft
    run and each send applies them, so a deadline takes effect by the first send after it (by
    the next draft alone, a week late with a weekly schedule). Returns (draft id, "approved"
    or "skipped") for each."""
    done = approval.apply_deadlines(app.store, app.settings, now)
    for draft_id, what in done:
        log.info("draft %s was not reviewed before the approval deadline: %s", draft_id, what)
    return done


def _make_draft(app: App, now: datetime) -> DraftOutcome:
    settings = app.settings
    apply_deadlines(app, now)
    key = period_key(settings, now)
    existing = app.store.live_draft_for_period(key)
    if existing is not None:
        return DraftOutcome(existing, False, f"draft {existing.id} already covers the period {key} "
                                             f"({existing.status})")
    from digest import ranking

    since = app.store.last_sent_at()
    essays = app.store.candidate_essays(since, settings.digest.max_essays)
    essay_ids = [i for i, _ in essays]
    by_essay = app.store.comments_for(essay_ids)
    ranked = ranking.rank({i: [c for _, c in by_essay[i]] for i in essay_ids}, settings.ranking,
                          {i: e.author for i, e in essays}, now)
    composed = drafting.compose(key, essays, ranked, settings)
    if composed is None:
        return DraftOutcome(None, False, "nothing new since the last digest: no draft made")
    draft_value, refs = composed
    draft, created = app.store.create_draft(draft_value, refs, now)
    if not created:  # another process drafted this period a moment ago
        return DraftOutcome(draft, False, f"draft {draft.id} already covers the period {key}")
    _compile_ahead(app, draft)
    if not settings.digest.approval.required:
        draft = approval.approve(app.store, draft.id or 0, now, by="auto-approve")
        return DraftOutcome(draft, True, f"draft {draft.id} created and approved automatically")
    notified, error = notify_approvers(app, draft)
    return DraftOutcome(draft, True, f"draft {draft.id} is ready for review", notified, error)


def notify_approvers(app: App, draft: Draft) -> tuple[tuple[str, ...], str | None]:
    """Email each approver that a draft is ready. A failure is reported, never fatal."""
    approvers = app.settings.digest.approval.approvers
    if not approvers:
        return (), None
    from digest.render.compose import compile_draft_ready

    base = app.settings.newsletter.public_url
    review_url = f"{base}/drafts/{draft.id}/{approval.approval_token(app.secret, draft)}"
    try:
        subject, html, text = compile_draft_ready(draft, app.settings.newsletter, review_url,
                                                  templates_dir=app.templates_dir)
        messages = [
            OutgoingMessage(ledger_id=0, draft_id=draft.id or 0, to_email=address, to_name="",
                            from_addr=app.settings.newsletter.from_, subject=subject, html=html, text=text,
                            tag="draft-ready")
            for address in approvers
        ]
        results = app.provider.send_batch(messages)
    except DigestError as exc:
        return (), f"could not email the approvers: {exc}"
    failed = [r.error or r.status for r in results if r.status != "sent"]
    return tuple(approvers), ("; ".join(failed) if failed else None)


# -- approve, reject, preview ----------------------------------------------------------------


def approve(app: App, draft_id: int, at: datetime | None = None, by: str = "cli") -> Draft:
    return approval.approve(app.store, draft_id, app.now(), at=at, by=by)


def reject(app: App, draft_id: int, reason: str = "", by: str = "cli") -> Draft:
    return approval.reject(app.store, draft_id, app.now(), reason=reason, by=by)


def review_html(app: App, draft_id: int, token: str) -> str:
    """The draft as a sample reader would get it, for the signed link in the "draft ready"
    email. ``TokenError`` unless the token was issued for exactly this content."""
    draft = app.store.get_draft(draft_id)
    payload = tokens.verify(app.secret, approval.APPROVE, token, max_age=approval.TOKEN_MAX_AGE)
    if payload != [draft.id, draft.content_hash]:
        raise TokenError("this review link is for other content")
    base = app.settings.newsletter.public_url
    html, _ = personalize(compile_for(app, draft), name="Reader", unsubscribe_url=f"{base}/u/preview",
                          preferences_url=f"{base}/preferences/preview")
    return html


def compile_for(app: App, draft: Draft) -> CompiledEmail:
    """The draft compiled for sending: the one stored when it was made, while the templates,
    the newsletter settings and the rendering code are still what it was made with; else
    compiled now (and stored for the next reader: the review page, a helper process, a
    resumed send). So a send loads a stored result and never imports the renderer."""
    key = render_key(draft, app.settings.newsletter, app.templates_dir) if draft.id is not None else None
    if key is not None and draft.id is not None:
        try:
            stored = app.store.compiled_draft(draft.id, key)
        except DigestError as exc:  # the stored copy only saves time; a compile does without it
            log.warning("draft %s: cannot read its stored compiled copy (%s); compiling it", draft.id, exc)
            stored = None
        if stored is not None:
            try:
                return CompiledEmail.from_json(stored)
            except (ValueError, TypeError) as exc:
                log.warning("draft %s: its stored compiled copy is unreadable (%s); compiling it again",
                            draft.id, exc)
    from digest.render.compose import compile_draft

    compiled = compile_draft(draft, app.settings.newsletter, templates_dir=app.templates_dir)
    if key is not None and draft.id is not None:
        try:
            app.store.save_compiled_draft(draft.id, key, compiled.to_json(), app.now())
        except DigestError as exc:
            log.warning("draft %s: cannot store its compiled copy (%s)", draft.id, exc)
    return compiled


def _compile_ahead(app: App, draft: Draft) -> None:
    """Compile a new draft and store the result, so that the approvers review exactly what a
    send then loads. A template problem is not the drafting's failure: the draft stays, and
    previewing or sending it reports the problem (as they did before drafts were compiled
    ahead)."""
    try:
        compile_for(app, draft)
    except DigestError as exc:
        log.warning("draft %s: could not compile it yet: %s", draft.id, exc)


def preview(app: App, draft_id: int, out: Path) -> tuple[Path, Path]:
    """Write the draft's HTML and text (as a sample reader would get them) to ``out``."""
    draft = app.store.get_draft(draft_id)
    compiled = compile_for(app, draft)
    base = app.settings.newsletter.public_url
    html, text = personalize(compiled, name="Reader", unsubscribe_url=f"{base}/u/preview",
                             preferences_url=f"{base}/preferences/preview")
    out.mkdir(parents=True, exist_ok=True)
    html_path = out / f"draft-{draft_id}.html"
    text_path = out / f"draft-{draft_id}.txt"
    html_path.write_text(html, encoding="utf-8")
    text_path.write_text(text, encoding="utf-8")
    return html_path, text_path


# -- send ------------------------------------------------------------------------------------


def send(app: App, *, dry_run: bool = False,
         on_batch: Callable[[SendSummary, int], None] | None = None,
         should_stop: Callable[[], bool] = lambda: False,
         on_deadline: Callable[[int, str], None] | None = None,
         draft_id: int | None = None, resume: bool | None = None) -> list[SendSummary]:
    """Apply the approval deadlines (each told to ``on_deadline`` as draft id and "approved"
    or "skipped"), then send approved, due drafts and resume unfinished sends. A dry run
    changes nothing, deadlines included.

    A send paused until the operator acts (failed batches in a row) is passed by, its summary
    saying so, unless ``draft_id`` names it: then that draft alone is sent, and resumed
    (``resume=False``: sent only if it does not wait for the operator)."""
    if not dry_run:
        for draft_id, what in apply_deadlines(app, app.now()):
            if on_deadline is not None:
                on_deadline(draft_id, what)
    summaries = []
    links = _dry_run_links(app) if dry_run else app.link_pair
    only = draft_id
    for draft_id in app.store.due_drafts(app.now()):
        if only is not None and draft_id != only:
            continue
        if should_stop():
            break  # shutting down: no draft is started
        draft = app.store.get_draft(draft_id)
        compiled = compile_for(app, draft)
        sender = Sender(app.store, app.provider, app.settings, draft, compiled, links, now=app.now,
                        on_batch=on_batch, should_stop=should_stop,
                        resume=only is not None if resume is None else resume)
        summary = sender.dry_run() if dry_run else sender.run()
        summaries.append(summary)
        if should_stop() or summary.blocked:
            break  # shutting down, or the next draft would fail the same way
    return summaries


def installation_tag(installation_id: str) -> str:
    """The installation as a provider's keys carry it: a short hash of the database's own id,
    not the id itself."""
    return hashlib.sha256(f"digest installation:{installation_id}".encode()).hexdigest()[:12]


def _dry_run_links(app: App) -> Callable[[int, str], tuple[str, str]]:
    """The links of a dry run's messages, signed with a key of its own: as long as a send's,
    so every request is as large, while the key that signs real links, made on first use,
    is not written to the database by a dry run. Its messages are never sent."""
    return _link_maker(app.settings.newsletter.public_url, secrets.token_urlsafe(32))


def _link_maker(public_url: str, secret: str) -> Callable[[int, str], tuple[str, str]]:
    """A subscriber's (unsubscribe URL, preferences URL), signed with ``secret``: the web
    app's ``/u/<token>`` and ``/preferences/<token>``."""
    return tokens.LinkSigner(secret).url_maker(f"{public_url}/u/", f"{public_url}/preferences/")


@dataclass(frozen=True)
class Resolution:
    """What ``digest send --resolve-uncertain`` did to a draft's uncertain messages.

    ``settled``: put back in the queue (``resend``: they go out in new batches, under new keys
    where the provider has keys, so any of them that did arrive arrive again) or counted as
    sent (``mark-sent``). ``kept``: with ``resend`` through a provider with idempotency keys,
    the messages left uncertain for the send to resend exactly as they went, under their
    keys (the provider delivers each once): the batches it would resend by itself."""

    settled: int
    kept: int = 0

    @property
    def total(self) -> int:
        return self.settled + self.kept


def resolve_uncertain(app: App, draft_id: int, how: str) -> Resolution:
    """Settle a draft's uncertain messages (``resend`` or ``mark-sent``).

    ``resend`` through a provider with idempotency keys leaves the batches that can still go
    out under their own keys (:func:`~digest.delivery.sender.resend_rule`: claimed through
    its key space, within its window) for the send to resend as they went; a batch put back
    in the queue would be claimed in a new group, under a new key, and delivered again."""
    if how not in ("resend", "mark-sent"):
        raise DraftError(f"unknown resolution {how!r}: use resend or mark-sent")
    from digest.delivery.sender import resend_rule

    app.store.get_draft(draft_id)
    if not app.store.ledger_counts(draft_id).get("uncertain"):
        return Resolution(0)  # nothing to settle: no need to wait for a sender at work on the draft
    with _send_lease(app, draft_id, "resolve its uncertain messages") as now:
        keep = resend_rule(app.provider, now) if how == "resend" else None
        settled = app.store.resolve_uncertain(draft_id, how, now, keep)
        # What is still uncertain is what the rule kept (under the lease, nothing else moved).
        kept = app.store.ledger_counts(draft_id).get("uncertain", 0) if keep is not None else 0
        return Resolution(settled, kept)


@contextmanager
def _send_lease(app: App, draft_id: int, what: str) -> Iterator[datetime]:
    """The draft's send lease, held for an operator's change to its ledger (yields now): a
    sender at work on the draft may be settling a batch this very moment, and its verdicts and
    the change must not cross. ``what`` the operator wanted, for the error when a send holds it."""
    from digest.delivery.sender import LEASE_SECONDS, holder_is_dead, lease_holder

    lease, holder, now = f"send:{draft_id}", lease_holder(), app.now()
    if not app.store.acquire_lease(lease, holder, now, now + timedelta(seconds=LEASE_SECONDS), holder_is_dead):
        raise DraftBusyError(f"draft {draft_id} is being sent by another process; {what} once that send has "
                         "finished or stopped")
    try:
        yield now
    finally:
        app.store.release_lease(lease, holder)


def resendable(app: App, draft_id: int) -> int:
    """How many of a draft's uncertain messages can go out again under their idempotency keys
    through the provider configured now (:func:`~digest.delivery.sender.resend_rule`): those a
    send of the draft resends by itself, and ``--resolve-uncertain resend`` leaves to it. 0 when
    the provider has no keys, or cannot be built (a setting missing)."""
    from digest.delivery.providers.registry import provider_class
    from digest.delivery.sender import resend_rule

    try:
        if not provider_class(app.settings.delivery.provider).idempotent:
            return 0  # (without building a provider only to learn that)
        rule = resend_rule(app.provider, app.now())
    except DigestError:
        return 0
    if rule is None:
        return 0
    batches = app.store.uncertain_batches(draft_id, "", app.now(), rule.since, via=rule.via, peek=True,
                                          max_attempts=rule.max_attempts)
    return sum(map(len, batches))


def retry_failed(app: App, draft_id: int, matching: str | None = None) -> int:
    """Put the draft's messages that failed (``failed``, not the provider's verdicts on a
    reader) back in the queue, or those whose error contains ``matching``; a send paused for
    the operator may then resume. Returns how many."""
    app.store.get_draft(draft_id)
    if not app.store.ledger_counts(draft_id).get("failed"):
        return 0
    with _send_lease(app, draft_id, "retry its failed messages") as now:
        return app.store.requeue_failed(draft_id, now, matching)


# -- one cycle, status, check ------------------------------------------------------------------


@dataclass
class CycleOutcome:
    collected: list[CollectOutcome]
    draft: DraftOutcome
    sends: list[SendSummary]


def run_cycle(app: App, should_stop: Callable[[], bool] = lambda: False) -> CycleOutcome:
    """collect → draft → send what is due."""
    collected = collect(app)
    drafted = make_draft(app)
    return CycleOutcome(collected, drafted, send(app, should_stop=should_stop))


@dataclass
class StatusReport:
    sources: list[SourceStatus]
    configured_sources: list[str]
    drafts: list[DraftSummary]
    ledgers: dict[int, dict[str, int]]
    subscribers: dict[str, int]
    events: dict[str, int]
    next_runs: dict[str, datetime | None] = field(default_factory=dict)
    # The draft run: when it last ran, and the scheduled time it missed (see missed_draft_run).
    last_draft_run: datetime | None = None
    missed_draft_run: datetime | None = None
    # Per draft with messages whose fate is unknown, the first of them (at most UNCERTAIN_LISTED).
    uncertain: dict[int, list[UncertainMessage]] = field(default_factory=dict)
    # Per draft with messages whose fate is unknown: how many of them the next `digest send`
    # resends by itself under their idempotency keys (see resendable); the rest need the operator.
    resendable: dict[int, int] = field(default_factory=dict)
    # Per draft still sending whose last batch was put back whole: why, and when.
    stopped: dict[int, tuple[str, datetime | None]] = field(default_factory=dict)
    # Per draft whose send waits for the operator (failed batches in a row): why, since when.
    held: dict[int, SendHold] = field(default_factory=dict)
    # Per draft with uncertain or failed messages: how many for each status and error.
    reasons: dict[int, list[ReasonCount]] = field(default_factory=dict)
    # With ``status(app, draft_id=N)``: that draft's first failed messages.
    failed: dict[int, list[UncertainMessage]] = field(default_factory=dict)
    # Per draft: the provider events (delivered, bounces, complaints ...) about its messages.
    draft_events: dict[int, dict[str, int]] = field(default_factory=dict)
    # Drafts with messages in flight whose sender is gone (killed, crashed, its lease run out).
    orphaned: set[int] = field(default_factory=set)


# How many uncertain messages `digest status` lists per draft; it says how many more there are.
UNCERTAIN_LISTED = 20


# The statuses of a message the provider or the sender gave up on (``failed`` in summaries).
FAILED_STATUSES = ("failed", "rejected", "invalid", "suppressed")


def status(app: App, draft_id: int | None = None) -> StatusReport:
    """What `digest status` shows: the last ten drafts, or with ``draft_id`` that one, with
    its failed messages listed too."""
    from digest.scheduler import next_run
    from digest.sources.registry import comment_blocks

    now = app.now()
    tz = app.settings.newsletter.timezone
    d = app.settings.digest
    ids = [draft_id] if draft_id is not None else app.store.drafts_with_ledger()[-10:]
    ledgers = {i: app.store.ledger_counts(i) for i in ids}
    drafts = app.store.list_drafts(limit=10)
    if draft_id is not None:
        drafts = [x for x in app.store.list_drafts(limit=None) if x.id == draft_id]
        if not drafts:
            raise DraftError(f"no draft with id {draft_id}", hint="`digest drafts` lists them")
    return StatusReport(
        sources=app.store.source_statuses(),
        configured_sources=[name for b in app.settings.sources
                            for name in (str(b["name"]), *(str(c["name"]) for c in comment_blocks(b)))],
        drafts=drafts,
        ledgers=ledgers,
        subscribers=app.store.count_subscribers(),
        events=app.store.event_counts(),
        next_runs={"collect": next_run(d.collect_schedule, tz, now), "draft": next_run(d.schedule, tz, now),
                   "send": next_run(d.send_schedule, tz, now)},
        last_draft_run=app.store.last_run("draft"),
        missed_draft_run=missed_draft_run(app),
        uncertain={i: app.store.uncertain_messages(i, UNCERTAIN_LISTED)
                   for i, counts in ledgers.items() if counts.get("uncertain")},
        # Only a draft being sent is taken up by the next send (a sent one, by the operator's
        # `--resolve-uncertain resend`).
        resendable={i: resendable(app, i) for i, counts in ledgers.items()
                    if counts.get("uncertain") and app.store.get_draft(i).status == "sending"},
        stopped={i: why for i, counts in ledgers.items()
                 if counts.get("pending") and (why := app.store.stopped_on(i)) is not None},
        held={i: hold for i in ledgers if (hold := app.store.send_hold(i)) is not None},
        reasons={i: app.store.reasons(i, ("uncertain", *FAILED_STATUSES)) for i, counts in ledgers.items()
                 if any(counts.get(s) for s in ("uncertain", *FAILED_STATUSES))},
        draft_events=app.store.draft_event_counts(list(ledgers)),
        orphaned={i for i, counts in ledgers.items() if counts.get("claimed") and not _sender_alive(app, i, now)},
        failed={i: app.store.messages_in(i, FAILED_STATUSES, UNCERTAIN_LISTED)
                for i, counts in ledgers.items()
                if draft_id is not None and any(counts.get(s) for s in FAILED_STATUSES)},
    )


def _sender_alive(app: App, draft_id: int, now: datetime) -> bool:
    """Whether a sender holds the draft's lease: not run out, and not a process of this host
    that is gone."""
    from digest.delivery.sender import holder_is_dead

    lease = app.store.lease(f"send:{draft_id}")
    if lease is None:
        return False
    holder, until = lease
    return until is not None and until > now and not holder_is_dead(holder)


def check(app: App, *, sleep: Callable[[float], None] = time.sleep) -> list[tuple[str, bool, str]]:
    """Reach every source and the provider without sending: (what, ok, detail).

    The provider is asked again (``sleep`` between calls) when it answers that it is rate
    limited or failing (a 429, a 5xx), a few times; its detail is one line either way.
    """
    from digest.sources.registry import build_source

    rows: list[tuple[str, bool, str]] = [("database", True, app.settings.database.url.split("@")[-1])]
    for block in app.settings.sources:
        source = build_source(block, app.session)
        result = source.collect(app.store.cursor(source.name), app.now())
        if result.error:
            rows.append((f"source {source.name}", False, result.error))
        else:
            detail = "not modified" if result.not_modified else (
                f"{len(result.essays)} essays, {len(result.comments)} comments")
            rows.append((f"source {source.name}", True, detail))
    what = f"provider {app.settings.delivery.provider}"
    try:
        rows.append((what, True, check_with_retries(app.provider, sleep=sleep)))
    except DeliveryError as exc:
        rows.append((what, False, " ".join(str(exc).split())))  # one line, whatever the provider said
    return rows


# -- demo ------------------------------------------------------------------------------------

DEMO_SUBSCRIBERS = (
    ("ada@example.com", "Ada Quill"),
    ("ben@example.org", "Ben Okafor"),
    ("chloe@example.net", "Chloé Martin"),
)


@dataclass
class DemoResult:
    workdir: Path
    draft: Draft
    preview_html: Path
    preview_text: Path
    eml_files: list[Path]
    collected: list[CollectOutcome]
    summary: SendSummary


def demo(workdir: Path, now: Callable[[], datetime] = clock.now) -> DemoResult:
    """collect → draft → approve → send on the bundled sample, in ``workdir``."""
    from digest import subscribers
    from digest.config import defaults

    workdir.mkdir(parents=True, exist_ok=True)
    for stale in ("digest.db", "digest.db-wal", "digest.db-shm"):
        (workdir / stale).unlink(missing_ok=True)
    shutil.rmtree(workdir / "outbox", ignore_errors=True)
    # The sample blog's own (fictional) address: the demo's emails look exactly like real
    # ones, https unsubscribe links included (RFC 8058).
    settings = defaults(workdir, public_url="https://fieldnotes.example.org")
    app = App.open(settings, now)
    try:
        for email, name in DEMO_SUBSCRIBERS:
            subscribers.add(app.store, email, name, app.now())
        collected = collect(app)
        drafted = make_draft(app)
        if drafted.draft is None or drafted.draft.id is None:
            raise DraftError(f"the sample produced no draft: {drafted.message}")
        approve(app, drafted.draft.id, by="demo")
        html_path, text_path = preview(app, drafted.draft.id, workdir / "preview")
        summaries = send(app)
        emls = sorted((workdir / "outbox").rglob("*.eml"))
        return DemoResult(workdir, app.store.get_draft(drafted.draft.id), html_path, text_path, emls,
                          collected, summaries[0])
    finally:
        app.close()


# -- provider webhooks -------------------------------------------------------------------------

# Event type → suppression reason. store.suppress marks the subscriber bounced, complained or
# unsubscribed, and the claim (rule 2) skips suppressed addresses, so the next batch of a send
# already in progress leaves them out.
SUPPRESSING_EVENTS = {"hard_bounce": "hard_bounce", "complaint": "complaint", "unsubscribe": "unsubscribed"}
SOFT_BOUNCE_LIMIT = 3
SOFT_BOUNCE_WINDOW = timedelta(days=30)
SUPPRESSION_RULES = SuppressionRules(SUPPRESSING_EVENTS, SOFT_BOUNCE_LIMIT, SOFT_BOUNCE_WINDOW)


@dataclass(frozen=True)
class WebhookOutcome:
    """What one webhook request did. ``seen`` is ``"duplicate"`` for a copy of a request already
    applied and ``"conflict"`` for its replay key on other content; neither applies anything.
    ``suppressed`` lists the addresses its new events suppress (one already on the suppression
    list too: the list keeps its first reason)."""

    provider: str
    received: int
    stored: int
    duplicates: int
    suppressed: tuple[str, ...] = ()
    seen: ReplaySeen = "new"


def apply_events(app: App, provider: str, events: list[DeliveryEvent], *, replay_key: str | None = None,
                 content_hash: str = "") -> WebhookOutcome:
    """Store each event once and apply it: hard bounces, complaints and unsubscribes suppress
    the address at once; soft bounces are only counted until ``SOFT_BOUNCE_LIMIT`` of them in
    ``SOFT_BOUNCE_WINDOW`` suppress it as ``soft_bounce_limit``. Everything else is stored only.

    All in one transaction with the request's ``replay_key`` (see ``Store.apply_webhook``): a
    copy of a request already received applies nothing, and neither does an event already
    stored, so a reader re-activated after a bounce stays active when a copy of it comes late.
    The key is remembered for twice the provider's freshness window: past it, a copy is
    refused as stale before it gets here.
    """
    now = app.now()
    keep_until = None
    if replay_key is not None:
        keep_until = now + timedelta(seconds=2 * app.settings.webhooks.max_age_for(provider))
    applied = app.store.apply_webhook(provider, events, now, SUPPRESSION_RULES, replay_key=replay_key,
                                      keep_until=keep_until, content_hash=content_hash)
    if applied.suppressed:
        log.info("webhooks: %s suppressed %d address(es)", provider, len(applied.suppressed))
    return WebhookOutcome(provider, len(events), applied.stored, applied.duplicates, applied.suppressed,
                          applied.seen)
