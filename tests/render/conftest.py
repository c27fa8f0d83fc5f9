"""Builders for render tests: drafts made straight from digest.types, no store, no config file."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any

import pytest

from digest.config import Newsletter
from digest.types import Comment, Draft, DraftItem, Essay, RankedComment

BASE = "https://fieldnotes.example.org"


def make_comment(
    essay_key: str, n: int, html: str, *, author: str | None = None, **kw: Any
) -> RankedComment:
    comment = Comment(
        source="test",
        essay_key=essay_key,
        key=f"{essay_key}-c{n}",
        author=f"Reader {n}" if author is None else author,
        html=html,
        url=kw.pop("url", f"{BASE}/essays/{essay_key}#c{n}"),
        score=kw.pop("score", 10.0 - n),
        **kw,
    )
    return RankedComment(comment=comment, rank_score=comment.score or 0.0, words=len(html.split()))


def make_essay(key: str, **kw: Any) -> Essay:
    fields: dict[str, Any] = {
        "source": "test",
        "key": key,
        "url": f"{BASE}/essays/{key}",
        "title": f"Essay {key}",
        "summary": f"<p>Summary of {key}.</p>",
        "author": "Maren Holt",
        "published": datetime(2026, 11, 3, 9, 0, tzinfo=UTC),
    }
    fields.update(kw)
    return Essay(**fields)


DraftFactory = Callable[..., Draft]


@pytest.fixture
def newsletter() -> Newsletter:
    # model_validate rather than Newsletter(...): the "from" alias confuses type checkers.
    return Newsletter.model_validate(
        {
            "name": "Field Notes Digest",
            "postal_address": "Field Notes, 12 Example Lane, Springfield",
            "public_url": BASE,
            "timezone": "Europe/Paris",
        }
    )


@pytest.fixture
def make_draft() -> DraftFactory:
    """``make_draft(comment_counts=(2, 1, 0), **draft_fields)``: n essays with n comments each."""

    def build(
        comment_counts: Sequence[int] = (2, 1, 0),
        *,
        items: tuple[DraftItem, ...] | None = None,
        **kw: Any,
    ) -> Draft:
        if items is None:
            built = []
            for e, count in enumerate(comment_counts, start=1):
                key = f"e{e}"
                comments = tuple(
                    make_comment(key, c, f"<p>Comment {c} on {key}: a thoughtful reply.</p>")
                    for c in range(1, count + 1)
                )
                built.append(DraftItem(essay=make_essay(key), comments=comments))
            items = tuple(built)
        fields: dict[str, Any] = {
            "period_key": "2026-W45",
            "subject": "Field Notes: the slow build",
            "intro": "Welcome back.\n\nThree essays this week.",
            "items": items,
            "id": 7,
        }
        fields.update(kw)
        return Draft(**fields)

    return build


URLS = {
    "unsubscribe_url": f"{BASE}/u/tok-unsub",
    "preferences_url": f"{BASE}/preferences/tok-prefs",
}


@pytest.fixture
def comment_factory() -> Callable[..., RankedComment]:
    return make_comment


@pytest.fixture
def essay_factory() -> Callable[..., Essay]:
    return make_essay


@pytest.fixture
def urls() -> dict[str, str]:
    """Per-recipient URLs as the sender would pass them."""
    return dict(URLS)
