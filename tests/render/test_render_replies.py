"""Replies quote their parent, cut comments link to the rest, author replies show as context."""

from __future__ import annotations

from dataclasses import replace

from digest.config import Newsletter
from digest.render import compile_draft, personalize
from digest.types import Draft, DraftItem

from .conftest import make_comment, make_essay


def render(newsletter: Newsletter, **ranked_fields: object) -> tuple[str, str]:
    rc = make_comment("e1", 1, "<p>Body of the reply.</p>")
    rc = replace(rc, **ranked_fields)  # type: ignore[arg-type]
    draft = Draft(period_key="p", subject="S", intro="", items=(DraftItem(make_essay("e1"), (rc,)),), id=1)
    return personalize(compile_draft(draft, newsletter), name="Ann", unsubscribe_url="https://x.org/u/t",
                       preferences_url="https://x.org/preferences/t")


def test_reply_quote_is_shown_and_escaped(newsletter: Newsletter) -> None:
    html, text = render(newsletter, reply_to_author="Bo <b>", reply_to_excerpt="The original </mj-text> point")
    assert "In reply to Bo &lt;b&gt;:" in html and "The original &lt;/mj-text&gt; point" in html
    assert 'wrote, in reply to Bo <b> ("The original </mj-text> point"):' in text


def test_truncated_comment_links_to_the_rest(newsletter: Newsletter) -> None:
    html, text = render(newsletter, truncated=True)
    assert ">Read the rest</a>" in html and "View comment" not in html
    assert "Read the rest: https://fieldnotes.example.org/essays/e1#c1" in text
    html, _ = render(newsletter)
    assert "View comment" in html and "Read the rest" not in html


def test_author_reply_is_sanitized_context(newsletter: Newsletter) -> None:
    html, text = render(newsletter, author_reply_author="Maren Holt",
                        author_reply_html="<p>Thanks!<script>alert(1)</script></p>")
    assert "Maren Holt replied" in html and "Thanks!" in html and "<script" not in html
    assert "Maren Holt replied:\n>> Thanks!" in text
