"""Flask app: the links in every sent email, and a health check.

``/u/<token>``: GET shows a confirmation page and changes nothing (mail scanners prefetch
links); POST unsubscribes at once, including the RFC 8058 one-click POST that mailbox
providers send with ``List-Unsubscribe=One-Click`` and no cookies. ``/preferences/<token>``
shows the subscription and offers the same unsubscribe button.
"""

from __future__ import annotations

from typing import Any

from flask import Flask, Response, render_template, request

from digest import subscribers
from digest.errors import TokenError
from digest.pipeline import App


def create_app(app: App) -> Flask:
    """The WSGI app over a pipeline ``App`` (the store and settings of this process)."""
    web = Flask(__name__)
    web.config["DIGEST_APP"] = app
    newsletter = app.settings.newsletter

    def page(template: str, status: int = 200, **context: Any) -> Response:
        body = render_template(template, newsletter=newsletter, **context)
        response = Response(body, status=status, mimetype="text/html")
        response.headers["Cache-Control"] = "no-store"
        response.headers["X-Robots-Tag"] = "noindex"
        response.headers["Referrer-Policy"] = "no-referrer"
        response.headers["Content-Security-Policy"] = "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'"
        return response

    def lookup(purpose: str, token: str) -> subscribers.Subscriber | None:
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

    @web.get("/healthz")
    def healthz() -> Response:
        app.store.count_subscribers()  # proves the database answers
        return Response("ok\n", mimetype="text/plain")

    return web
