"""Feed items PostgreSQL cannot store as they come (a key longer than ``essays.key``'s 2000
characters, a NUL, which PostgreSQL text cannot hold) are stored cleaned, the same way each
run; and a source whose results the store still refuses is that source's failure, not the
whole collect's (rule 8). Run on SQLite and, with DIGEST_TEST_POSTGRES_URL, on PostgreSQL."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest
from sqlalchemy import select

from digest import pipeline
from digest.errors import StoreError
from digest.store import Store
from digest.store.schema import essays
from digest.types import CollectResult, Comment, Essay
from tests.conftest import NOW, FrozenClock, make_settings
from tests.fakes.site_server import Answer, LocalSite, Seen

LONG_A = "urn:guid:" + "a" * 2100  # longer than essays.key
LONG_B = "urn:guid:" + "a" * 2099 + "b"  # the same first 2108 characters: another item all the same


def _rss(*guids: str) -> bytes:
    items = "".join(f"<item><title>Item {i}</title><guid isPermaLink=\"false\">{guid}</guid>"
                    f"<link>https://blog.example.org/{i}</link><pubDate>Wed, 25 Nov 2026 08:00:00 GMT</pubDate>"
                    f"<description>Body {i}</description></item>" for i, guid in enumerate(guids))
    return (f'<?xml version="1.0" encoding="utf-8"?><rss version="2.0"><channel><title>Blog</title>'
            f"<link>https://blog.example.org/</link>{items}</channel></rss>").encode()


JSON_FEED = json.dumps({
    "version": "https://jsonfeed.org/version/1.1", "title": "Notes", "home_page_url": "https://notes.example.org/",
    "items": [{"id": "note\u00001", "url": "https://notes.example.org/1", "title": "A\u0000title",
               "content_html": "<p>Nul\u0000here</p>", "date_published": "2026-11-25T08:00:00Z"}],
}).encode()


def _answer(req: Seen) -> Answer | None:
    if req.path == "/long.xml":
        return 200, {"Content-Type": "application/rss+xml"}, _rss(LONG_A, LONG_B, "short-guid")
    if req.path == "/nul.json":
        return 200, {"Content-Type": "application/feed+json"}, JSON_FEED
    return None


@pytest.fixture
def app(tmp_path: Path, db_url: str, clock: FrozenClock) -> Iterator[pipeline.App]:
    from digest.sources.folder import SAMPLE_DIR

    with LocalSite(_answer) as site:
        settings = make_settings(tmp_path, db_url, sources=[
            {"name": "long", "type": "feed", "url": f"{site.url}/long.xml", "comment_feeds": False},
            {"name": "nul", "type": "feed", "url": f"{site.url}/nul.json", "comment_feeds": False},
            {"name": "sample", "type": "folder", "path": str(SAMPLE_DIR)},
        ])
        a = pipeline.App.open(settings, clock)
        yield a
        a.close()


def _stored(app: pipeline.App, source: str) -> list[tuple[str, str, str]]:
    with app.store.engine.connect() as conn:
        return [(r.key, r.title, r.html) for r in conn.execute(
            select(essays.c.key, essays.c.title, essays.c.html).where(essays.c.source == source)
            .order_by(essays.c.id))]


def test_items_with_long_keys_or_nul_are_stored_and_the_other_sources_collected(app: pipeline.App) -> None:
    outcomes = {o.source: o for o in pipeline.collect(app)}
    assert {s: o.error for s, o in outcomes.items()} == {"long": None, "nul": None, "sample": None}
    assert [outcomes[s].stats.new_essays for s in ("long", "nul", "sample")] == [3, 1, 4]
    long_keys = [key for key, _title, _html in _stored(app, "long")]
    # Hashed, never cut: the two long guids stay two items; a short one stays itself.
    assert len(set(long_keys)) == 3 and "short-guid" in long_keys
    assert all(len(key) <= 2000 for key in long_keys)
    ((key, title, html),) = _stored(app, "nul")
    assert "\x00" not in key + title + html and "here" in html
    # The same items the next run: found again, not new, and not changed either.
    again = {o.source: o for o in pipeline.collect(app)}
    assert {s: (o.error, o.stats.new_essays, o.stats.updated_essays) for s, o in again.items()} == {
        "long": (None, 0, 0), "nul": (None, 0, 0), "sample": (None, 0, 0)}
    assert [k for k, _t, _h in _stored(app, "long")] == long_keys


def test_a_source_whose_results_the_store_refuses_fails_alone(app: pipeline.App,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    record = app.store.record_collect

    def refusing(result: CollectResult, now: datetime) -> object:
        if result.source == "long" and not result.error:
            raise StoreError("database error: DataError: the database refused the write")
        return record(result, now)

    monkeypatch.setattr(app.store, "record_collect", refusing)
    outcomes = {o.source: o for o in pipeline.collect(app)}
    assert outcomes["long"].error is not None and "refused the write" in outcomes["long"].error
    assert "\n" not in outcomes["long"].error  # one line
    assert outcomes["nul"].error is None and outcomes["sample"].stats.new_essays == 4
    status = {s.source: s for s in app.store.source_statuses()}
    assert status["long"].last_error == outcomes["long"].error and status["long"].last_success_at is None
    assert status["sample"].last_error is None


def test_the_store_keeps_a_comment_on_an_essay_with_a_long_key(store: Store) -> None:
    """Comments name their essay by its key as the source gave it, and name their parent the
    same way: both find what the store keeps."""
    essay = Essay("blog", LONG_A, "https://blog.example.org/1", "Title\x00", html="<p>x\ud800</p>")
    parent = Comment("blog", LONG_A, LONG_B, "Ada", "<p>first\x00</p>")
    reply = Comment("blog", LONG_A, "reply\x00", "Bo", "<p>second</p>", parent_key=LONG_B)
    stats = store.record_collect(CollectResult("blog", essays=(essay,), comments=(parent, reply)), NOW)
    assert (stats.new_essays, stats.new_comments) == (1, 2)
    ((essay_id, stored),) = store.candidate_essays(None, 10)
    assert stored.key != LONG_A and len(stored.key) <= 2000 and stored.title == "Title\ufffd"
    assert stored.html == "<p>x\ufffd</p>"  # a lone surrogate, which neither driver can encode
    by_key = {c.key: c for _id, c in store.comments_for([essay_id])[essay_id]}
    assert len(by_key) == 2 and LONG_B not in by_key
    assert by_key["reply\ufffd"].parent_key in by_key  # the parent's stored key
    # Again, as the next run brings them: nothing new, nothing changed, nothing gone.
    again = store.record_collect(CollectResult("blog", essays=(essay,), comments=(parent, reply)), NOW)
    assert again == type(again)()
