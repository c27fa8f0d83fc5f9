"""The links in every email: /u/<token> (RFC 8058) and /preferences/<token>."""

from __future__ import annotations

from pathlib import Path

import pytest
from flask.testing import FlaskClient

from digest import pipeline, subscribers
from digest.web.app import create_app
from tests.conftest import FrozenClock, make_settings


@pytest.fixture
def app(tmp_path: Path, clock: FrozenClock) -> pipeline.App:
    a = pipeline.App.open(make_settings(tmp_path), clock)
    subscribers.add(a.store, "ann@example.com", "Ann", clock())
    yield a
    a.close()


@pytest.fixture
def client(app: pipeline.App) -> FlaskClient:
    return create_app(app).test_client()


def tokens(app: pipeline.App) -> tuple[str, str]:
    sub = app.store.subscriber_by_email("ann@example.com")
    assert sub is not None
    unsub, prefs = app.links(pipeline.Recipient(sub.id, sub.email, sub.name))
    return unsub.rsplit("/", 1)[1], prefs.rsplit("/", 1)[1]


def status(app: pipeline.App) -> str:
    sub = app.store.subscriber_by_email("ann@example.com")
    assert sub is not None
    return sub.status


def test_get_shows_a_page_and_changes_nothing(app: pipeline.App, client: FlaskClient) -> None:
    unsub, _ = tokens(app)
    for _ in range(3):  # mail scanners prefetch links
        r = client.get(f"/u/{unsub}")
        assert r.status_code == 200
        assert b"Unsubscribe from" in r.data and b"ann@example.com" in r.data and b'method="post"' in r.data
    assert status(app) == "active"
    assert r.headers["Cache-Control"] == "no-store"


def test_one_click_post_unsubscribes_at_once(app: pipeline.App, client: FlaskClient) -> None:
    unsub, _ = tokens(app)
    r = client.post(f"/u/{unsub}", data="List-Unsubscribe=One-Click",
                    content_type="application/x-www-form-urlencoded")
    assert r.status_code == 200 and r.data == b"unsubscribed\n"
    assert status(app) == "unsubscribed"
    again = client.post(f"/u/{unsub}", data={"List-Unsubscribe": "One-Click"})  # idempotent
    assert again.status_code == 200
    assert status(app) == "unsubscribed"


def test_one_click_multipart_is_accepted(app: pipeline.App, client: FlaskClient) -> None:
    unsub, _ = tokens(app)
    r = client.post(f"/u/{unsub}", data={"List-Unsubscribe": "One-Click"}, content_type="multipart/form-data")
    assert r.status_code == 200 and status(app) == "unsubscribed"


def test_form_post_shows_confirmation(app: pipeline.App, client: FlaskClient) -> None:
    unsub, _ = tokens(app)
    r = client.post(f"/u/{unsub}")
    assert r.status_code == 200 and b"You are unsubscribed" in r.data
    assert status(app) == "unsubscribed"


def test_forged_and_cross_purpose_tokens_are_refused(app: pipeline.App, client: FlaskClient) -> None:
    unsub, prefs = tokens(app)
    assert client.post(f"/u/{unsub[:-3]}abc").status_code == 404
    assert client.post(f"/u/{prefs}").status_code == 404  # a preferences token cannot unsubscribe
    assert client.get(f"/preferences/{unsub}").status_code == 404
    assert status(app) == "active"


def test_preferences_page_offers_unsubscribe(app: pipeline.App, client: FlaskClient) -> None:
    unsub, prefs = tokens(app)
    r = client.get(f"/preferences/{prefs}")
    assert r.status_code == 200 and b"ann@example.com" in r.data
    assert f'action="/u/{unsub}"'.encode() in r.data


def test_healthz(client: FlaskClient) -> None:
    r = client.get("/healthz")
    assert r.status_code == 200 and r.data == b"ok\n"


def test_review_link_in_the_draft_ready_email_shows_the_draft(tmp_path: Path, clock: FrozenClock) -> None:
    import email
    import email.policy
    import re

    a = pipeline.App.open(make_settings(tmp_path, digest={"approval": {"approvers": ["me@example.org"]}}), clock)
    pipeline.collect(a)
    draft = pipeline.make_draft(a).draft
    assert draft is not None
    (eml,) = (tmp_path / "outbox").rglob("*.eml")
    text = email.message_from_bytes(eml.read_bytes(), policy=email.policy.default).get_body(("plain",)).get_content()
    url = re.search(r"https://news\.example\.org(/drafts/\S+)", text)
    assert url is not None
    client = create_app(a).test_client()
    r = client.get(url.group(1))
    assert r.status_code == 200 and b"The Quiet Pager" in r.data and b"12 Example Lane" in r.data
    assert a.store.get_draft(draft.id or 0).status == "pending_review"  # looking changes nothing
    assert client.get(url.group(1)[:-3] + "xyz").status_code == 404
    assert client.get(f"/drafts/{draft.id}/forged").status_code == 404
    a.close()


def test_a_bounced_reader_can_still_unsubscribe_from_both_pages(app: pipeline.App, client: FlaskClient,
                                                                clock: FrozenClock) -> None:
    from digest.errors import SubscriberError

    app.store.suppress("ann@example.com", "hard_bounce", "postmark", clock())
    assert status(app) == "bounced"
    unsub, prefs = tokens(app)
    page = client.get(f"/u/{unsub}")
    assert b"paused because it bounced" in page.data and b'method="post"' in page.data
    assert f'action="/u/{unsub}"'.encode() in client.get(f"/preferences/{prefs}").data
    assert status(app) == "bounced"  # the pages change nothing
    done = client.post(f"/u/{unsub}")
    assert b"You are unsubscribed" in done.data and status(app) == "unsubscribed"
    with pytest.raises(SubscriberError, match="only the reader"):  # the operator cannot undo it
        subscribers.reactivate(app.store, "ann@example.com", clock())
    assert status(app) == "unsubscribed"
