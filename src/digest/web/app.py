"""Flask app: the links in every sent email, provider webhooks, and a health check.

``/u/<token>``: GET shows a confirmation page and changes nothing (mail scanners prefetch
links); POST unsubscribes at once, including the RFC 8058 one-click POST that mailbox
providers send with ``List-Unsubscribe=One-Click`` and no cookies. ``/preferences/<token>``
shows the subscription and offers the same unsubscribe button.

``/webhooks/<provider>`` (POST only): verify (401 bad credentials or signature; 403 stale,
wrong topic or provider not configured; 503 when an SNS certificate cannot be fetched), parse
(400 if malformed), then apply through ``pipeline.apply_events`` and answer 200 with JSON
counts. The request's replay key and its events are recorded in one transaction: a copy of a
request already applied (the provider's retry after our answer was lost) answers 200 with
``"duplicate": true`` and applies nothing; a request that could not be applied (a database
error: 503) leaves nothing behind, so its retry applies it. Only a Mailgun token reused on a
different body is refused, with 406. An SNS SubscriptionConfirmation is confirmed on every
validly signed copy. See ``digest.web.webhooks`` for each provider's rules.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

from flask import Flask, Response, render_template, request

from digest import subscribers
from digest.errors import DraftError, StoreError, TokenError, WebhookVerificationError
from digest.pipeline import App, apply_events, review_html
from digest.store.store import Subscriber
from digest.web import webhooks
from digest.web.webhooks import ses

log = logging.getLogger(__name__)

# The largest webhook body read; SendGrid batches are the biggest and stay well below this.
MAX_WEBHOOK_BYTES = 5 * 1024 * 1024


def create_app(
    app: App,
    *,
    sns_certificates: ses.CertificateCache | None = None,
    sns_confirm: Callable[[str], None] | None = None,
) -> Flask:
    """The WSGI app over a pipeline ``App`` (the store and settings of this process).

    ``sns_certificates`` and ``sns_confirm`` are the only network calls webhooks make (fetching
    an SNS signing certificate, confirming an SNS subscription); tests pass fakes.
    """
    web = Flask(__name__)
    web.config["DIGEST_APP"] = app
    newsletter = app.settings.newsletter

    def page(template: str, status: int = 200, **context: Any) -> Response:
        body = render_template(template, newsletter=newsletter, **context)
        response = Response(body, status=status, mimetype="text/html")
        response.headers["Cache-Control"] = "no-store"
        response.headers["X-Robots-Tag"] = "noindex"
        response.headers["Referrer-Policy"] = "no-referrer"
        response.headers["Content-Security-Policy"] = (
            "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'")
        return response

    def lookup(purpose: str, token: str) -> Subscriber | None:
        try:
            return subscribers.subscriber_for_token(app.store, app.secret, purpose, token)
        except TokenError:
            return None

    @web.get("/u/<token>")
    def unsubscribe_page(token: str) -> Response:
        sub = lookup(subscribers.UNSUBSCRIBE, token)
        if sub is None:
            return page("invalid.html", 404)
        return page("unsubscribe.html", sub=sub, done=False)

    @web.post("/u/<token>")
    def unsubscribe(token: str) -> Response:
        sub = lookup(subscribers.UNSUBSCRIBE, token)
        if sub is None:
            return page("invalid.html", 404)
        subscribers.unsubscribe(app.store, sub, app.now())
        if request.form.get("List-Unsubscribe") == "One-Click":
            # RFC 8058: a machine is asking; a short answer is all it needs.
            return Response("unsubscribed\n", status=200, mimetype="text/plain")
        return page("unsubscribe.html", sub=sub, done=True)

    @web.get("/preferences/<token>")
    def preferences(token: str) -> Response:
        sub = lookup(subscribers.PREFERENCES, token)
        if sub is None:
            return page("invalid.html", 404)
        unsub_token = subscribers.token_for(app.secret, subscribers.UNSUBSCRIBE, sub.id, sub.email)
        return page("preferences.html", sub=sub, unsubscribe_token=unsub_token)

    def webhook_answer(status: int, **body: Any) -> Response:
        response = Response(json.dumps(body, sort_keys=True) + "\n", status=status,
                            mimetype="application/json")
        response.headers["Cache-Control"] = "no-store"
        return response

    @web.post("/webhooks/<provider>")
    def webhook(provider: str) -> Response:
        # Only POST is routed: Flask answers GET (a scanner, a curious operator) with 405.
        try:
            handler = webhooks.handler(provider)
        except KeyError:
            return webhook_answer(404, error="unknown provider")
        declared = request.content_length
        if declared is not None and declared > MAX_WEBHOOK_BYTES:
            return webhook_answer(413, error="body too large")
        raw = request.stream.read(MAX_WEBHOOK_BYTES + 1)  # bounded even without Content-Length
        if len(raw) > MAX_WEBHOOK_BYTES:
            return webhook_answer(413, error="body too large")
        headers = dict(request.headers.items())
        settings = app.settings.webhooks
        now = app.now()
        try:
            if provider == "ses":  # SNS alone verifies with a fetched certificate (injectable)
                verified = ses.verify(headers, raw, settings, now, certificates=sns_certificates)
            else:
                verified = handler.verify(headers, raw, settings, now)
            events = handler.parse(raw)
        except WebhookVerificationError as exc:
            # The reasons are short fixed phrases: they name the check, never a secret or the
            # expected value.
            status = int(getattr(exc, "status", 403))
            log.warning("webhooks: %s: refused with %d: %s", provider, status, exc)
            response = webhook_answer(status, error=str(exc))
            if status == 401 and provider == "postmark":
                response.headers["WWW-Authenticate"] = 'Basic realm="digest webhooks"'
            return response
        except ValueError as exc:
            log.warning("webhooks: %s: unparseable body: %s", provider, exc)
            return webhook_answer(400, error="unparseable body")
        if verified.subscribe_url is not None:
            # An SNS SubscriptionConfirmation is confirmed every time a validly signed, fresh copy
            # arrives; it has no events and no replay memory. SNS sends one again, with the same
            # MessageId (docs.aws.amazon.com/sns/latest/dg/http-subscription-confirmation-json.html),
            # when it did not get our 200: our fetch of SubscribeURL failed or hung, or our answer
            # was lost. A copy answered as a duplicate without fetching could leave the
            # subscription pending for good. Fetching again is safe: the token stays valid for
            # three days (AWS SNS API reference, Subscribe: "Confirmation tokens are valid for three
            # days"), and ConfirmSubscription for a subscription already confirmed answers with its
            # ARN and changes nothing. AWS's reference does not say that last part in words; it is
            # what LocalStack's SNS does, whose HTTP subscription behaviour was checked against AWS
            # (localstack/localstack, localstack/services/sns/provider.py, "ConfirmSubscription is
            # idempotent"; pull request #8129).
            try:
                (sns_confirm or ses.confirm_subscription)(verified.subscribe_url)
            except webhooks.Unavailable as exc:
                log.warning("webhooks: %s: %s", provider, exc)
                return webhook_answer(503, error=str(exc))
            log.info("webhooks: ses: confirmed the SNS subscription")
            return webhook_answer(200, received=0, stored=0, duplicates=0, suppressed=0, confirmed=True)
        try:
            # The events and the replay key are recorded in one transaction: a remembered key
            # means its events were applied, and a failure here remembers neither, so the
            # provider's retry is let in and applies them.
            outcome = apply_events(app, provider, events, replay_key=verified.replay_key,
                                   content_hash=verified.content_hash or "")
        except StoreError as exc:
            # Nothing was recorded; the provider retries a 503 (a database busy or restarting).
            log.warning("webhooks: %s: not applied, answering 503 so that it is sent again: %s", provider, exc)
            return webhook_answer(503, error="temporarily unavailable, retry later")
        if outcome.seen == "conflict":
            # Only where the signature leaves the body uncovered (Mailgun): a captured
            # signature on another body. 406 is what makes Mailgun stop retrying.
            log.warning("webhooks: %s: refused a reused signature on a different body", provider)
            return webhook_answer(406, error="replayed signature on a different body")
        body: dict[str, Any] = {"received": outcome.received, "stored": outcome.stored,
                                "duplicates": outcome.duplicates, "suppressed": len(outcome.suppressed)}
        if outcome.seen == "duplicate":
            # The same signed content again: the provider retrying after our answer was lost
            # (or a replay). Its events were applied with the key, so nothing is applied again;
            # 200 stops the retries.
            log.info("webhooks: %s: a copy of a request already received; answering 200, "
                     "nothing is applied again", provider)
            body["duplicate"] = True
        elif verified.message_type == "unsubscribe_confirmation":
            log.warning("webhooks: ses: SNS reports this endpoint was unsubscribed from its topic")
        return webhook_answer(200, **body)

    @web.get("/drafts/<int:draft_id>/<token>")
    def review(draft_id: int, token: str) -> Response:
        """The draft exactly as readers will get it (read-only: approving is `digest approve`)."""
        try:
            body = review_html(app, draft_id, token)
        except (TokenError, DraftError):
            return page("invalid.html", 404)
        response = Response(body, mimetype="text/html")
        response.headers["Cache-Control"] = "no-store"
        response.headers["X-Robots-Tag"] = "noindex"
        response.headers["Referrer-Policy"] = "no-referrer"
        return response

    @web.get("/healthz")
    def healthz() -> Response:
        app.store.count_subscribers()  # proves the database answers
        return Response("ok\n", mimetype="text/plain")

    return web
