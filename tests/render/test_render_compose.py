"""compile_draft + personalize: hostile content, slots, escaping, structure, errors."""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import pytest

from digest.config import Newsletter
from digest.errors import RenderError
from digest.render import SLOT_NAMES, CompiledEmail, compile_draft, compose, personalize
from digest.types import Draft, DraftItem, Essay, RankedComment

DraftFactory = Callable[..., Draft]

HOSTILE = (
    '</mj-text></mj-column></mj-section><mj-button href="https://evil.example/btn">Evil</mj-button>'
    "{{ 7 * 7 }}{% if true %}JINJA{% endif %} & <script>alert('x')</script>"
)


def _hostile_draft(
    comment_factory: Callable[..., RankedComment], essay_factory: Callable[..., Essay]
) -> Draft:
    essay = essay_factory(
        "evil",
        title=HOSTILE,
        author=HOSTILE,
        summary="<p>Summary &lt;/mj-text&gt; {{ x }} {% raw %}<script>steal()</script></p>",
    )
    comments = (
        comment_factory("evil", 1, f"<p>{HOSTILE}</p>", author=HOSTILE),
        comment_factory(
            "evil",
            2,
            "<p>&lt;/mj-text&gt; &lt;mj-button&gt; {{ x }} {% if %} &amp; &lt;script&gt;</p>"
            '<mj-raw><img src=x onerror="alert(1)"></mj-raw><p onclick="alert(2)">Still here</p>',
        ),
        comment_factory("evil", 3, "<p>a <a href='javascript:alert(1)'>js link</a> b</p>"),
    )
    return Draft(
        period_key="2026-W45",
        subject=HOSTILE,
        intro=HOSTILE,
        items=(DraftItem(essay=essay, comments=comments), DraftItem(essay=essay_factory("ok"))),
        id=1,
    )


def test_hostile_content_stays_literal_through_the_full_compile(
    comment_factory: Callable[..., RankedComment],
    essay_factory: Callable[..., Essay],
    newsletter: Newsletter,
    urls: dict[str, str],
) -> None:
    compiled = compile_draft(_hostile_draft(comment_factory, essay_factory), newsletter)
    html, text = personalize(compiled, name="Ann", **urls)

    # Nothing hostile became markup: no script, no injected button or link, no MJML left.
    lowered = html.lower()
    assert "<script" not in lowered and "<img" not in lowered and "onclick" not in lowered
    assert "onerror" not in lowered and "javascript:" not in lowered
    assert 'href="https://evil.example' not in html and '<a href="https://evil' not in html
    assert "<mj-" not in html and "</mj-" not in html
    # Every hostile string is visible as literal, escaped text.
    escaped = "&lt;/mj-text&gt;&lt;/mj-column&gt;&lt;/mj-section&gt;&lt;mj-button"
    assert html.count(escaped) >= 4  # subject (h1), intro, title, author, comment body, ...
    assert "{{ 7 * 7 }}{% if true %}JINJA{% endif %} &amp; &lt;script&gt;" in html
    assert "&lt;mj-button&gt; {{ x }} {% if %} &amp; &lt;script&gt;" in html
    assert "49" not in re.sub(r"<[^>]*>", "", html)  # the template never evaluated {{ 7 * 7 }}
    # The document structure survived: both essays, all three comment cards, the footer.
    assert html.count("View comment") == 3
    assert "Still here" in html and "js link" in html
    assert "Essay ok" in html and "Unsubscribe" in html

    # The text part has it all as plain literal text.
    assert HOSTILE.replace("<script>alert('x')</script>", "") in text
    assert "{{ 7 * 7 }}" in text and "</mj-text>" in text

    # Headers never see control characters or newlines.
    assert "\n" not in compiled.subject and "\r" not in compiled.subject


def test_subject_and_preheader_are_single_clean_lines(
    make_draft: DraftFactory, newsletter: Newsletter
) -> None:
    compiled = compile_draft(
        make_draft(subject="Hi\r\nBcc: evil@example.org\x00", intro="x" * 500), newsletter
    )
    assert compiled.subject == "Hi Bcc: evil@example.org"
    assert len(compiled.preheader) <= 140 and compiled.preheader.endswith("…")


def test_preheader_comes_from_intro_else_first_summary(
    make_draft: DraftFactory, newsletter: Newsletter
) -> None:
    with_intro = compile_draft(make_draft(intro="Welcome back.\n\nThree essays."), newsletter)
    assert with_intro.preheader == "Welcome back. Three essays."
    without = compile_draft(make_draft(intro=""), newsletter)
    assert without.preheader == "Summary of e1."
    html, _ = personalize(
        without,
        name="",
        unsubscribe_url="https://x.example/u",
        preferences_url="https://x.example/p",
    )
    assert re.search(r'<div style="display:none;[^"]*">Summary of e1\.</div>', html)


def test_personalize_fills_every_slot_and_leaves_no_marker(
    make_draft: DraftFactory, newsletter: Newsletter, urls: dict[str, str]
) -> None:
    compiled = compile_draft(make_draft(), newsletter)
    assert set(compiled.html_slots) == set(SLOT_NAMES) and set(compiled.text_slots) == set(
        SLOT_NAMES
    )
    assert len(compiled.html_parts) == len(compiled.html_slots) + 1
    html, text = personalize(compiled, name="Ann", **urls)
    for out in (html, text):
        assert "DIGESTSLOT" not in out
        assert "Field Notes, 12 Example Lane, Springfield" in out
        assert "You receive this because you subscribed at" in out
    assert (
        f'href="{urls["unsubscribe_url"]}"' in html and f'href="{urls["preferences_url"]}"' in html
    )
    assert ">Unsubscribe</a>" in html and ">Update preferences</a>" in html
    assert f"Unsubscribe: {urls['unsubscribe_url']}" in text
    assert f"Update preferences: {urls['preferences_url']}" in text
    assert "Hello Ann," in html and "Hello Ann," in text


def test_nonce_differs_per_compile_and_cannot_be_forged(
    monkeypatch: pytest.MonkeyPatch,
    make_draft: DraftFactory,
    comment_factory: Callable[..., RankedComment],
    essay_factory: Callable[..., Essay],
    newsletter: Newsletter,
    urls: dict[str, str],
) -> None:
    seen: list[str] = []
    real = compose._compile_mjml

    def spy(source: str, name: str) -> str:
        found = set(re.findall(r"DIGESTSLOT([0-9a-f]+)unsubscribe_url\1", source))
        seen.extend(found - {"0123456789abcdef"})
        return real(source, name)

    monkeypatch.setattr(compose, "_compile_mjml", spy)
    # A comment that tries to look like a marker, with a guessed nonce.
    forged = "DIGESTSLOT0123456789abcdefunsubscribe_url0123456789abcdef"
    item = DraftItem(
        essay=essay_factory("e1"), comments=(comment_factory("e1", 1, f"<p>{forged}</p>"),)
    )
    draft = make_draft(items=(item,))
    compile_draft(draft, newsletter)
    compiled = compile_draft(draft, newsletter)
    assert len(seen) == 2 and len(set(seen)) == 2
    assert all(len(nonce) == 16 for nonce in seen)
    html, text = personalize(compiled, name="Ann", **urls)
    assert forged in html and forged in text  # stayed literal, was not filled in
    assert html.count(urls["unsubscribe_url"]) == 1


def test_personalize_escapes_the_name_for_html_only(
    make_draft: DraftFactory, newsletter: Newsletter, urls: dict[str, str]
) -> None:
    compiled = compile_draft(make_draft(), newsletter)
    html, text = personalize(compiled, name='<b>Ann & "Bo"</b>', **urls)
    assert "Hello &lt;b&gt;Ann &amp; &quot;Bo&quot;&lt;/b&gt;," in html
    assert "<b>Ann" not in html
    assert 'Hello <b>Ann & "Bo"</b>,' in text


def test_personalize_strips_control_characters_and_falls_back(
    make_draft: DraftFactory, newsletter: Newsletter, urls: dict[str, str]
) -> None:
    compiled = compile_draft(make_draft(), newsletter)
    html, text = personalize(compiled, name="Ann\r\nBcc: x@example.org\x00\u202e", **urls)
    assert "Hello Ann Bcc: x@example.org," in text and "\r" not in text and "\x00" not in text
    assert "\u202e" not in html
    for empty in ("", "   ", "\r\n\x07"):
        html, text = personalize(compiled, name=empty, **urls)
        assert "Hello reader," in html and "Hello reader," in text
    html, _ = personalize(compiled, name="A" * 500, **urls)
    assert "A" * 80 + "," in html and "A" * 81 not in html


def test_personalize_escapes_urls_in_attributes_and_rejects_other_schemes(
    make_draft: DraftFactory, newsletter: Newsletter
) -> None:
    compiled = compile_draft(make_draft(), newsletter)
    html, text = personalize(
        compiled,
        name="Ann",
        unsubscribe_url='https://x.example/u?a=1&b="2"',
        preferences_url="https://x.example/p",
    )
    assert 'href="https://x.example/u?a=1&amp;b=&quot;2&quot;"' in html
    assert 'Unsubscribe: https://x.example/u?a=1&b="2"' in text
    with pytest.raises(RenderError):
        personalize(
            compiled,
            name="Ann",
            unsubscribe_url="javascript:alert(1)",
            preferences_url="https://x.example/p",
        )
    with pytest.raises(RenderError):
        personalize(
            compiled, name="Ann", unsubscribe_url="https://x.example/u", preferences_url="/p"
        )


def test_structure_matches_the_draft(
    make_draft: DraftFactory, newsletter: Newsletter, urls: dict[str, str]
) -> None:
    compiled = compile_draft(make_draft(comment_counts=(2, 1, 0)), newsletter)
    html, text = personalize(compiled, name="Ann", **urls)
    assert html.count("<h2") == 3
    for key in ("e1", "e2", "e3"):
        assert (
            html.count(f'<a href="https://fieldnotes.example.org/essays/{key}"') == 2
        )  # title + button
        assert html.count(f">Essay {key}</a></h2>") == 1
    assert html.count(">Read the essay</a>") == 3
    assert html.count("What readers said") == 2
    assert html.count("View comment") == 3
    assert html.count("a thoughtful reply.") == 3
    assert html.count("By Maren Holt · 3 November 2026") == 3
    assert '<html lang="en"' in html
    assert "fonts.googleapis" not in html and "<link" not in html
    assert "Ubuntu" not in html  # MJML's default font never shows up: ours is the system stack
    assert "<title>Field Notes: the slow build</title>" in html

    lines = text.splitlines()
    assert lines[0] == "Field Notes Digest"
    assert [line for line in lines if re.match(r"\d\. ", line)] == [
        "1. Essay e1",
        "2. Essay e2",
        "3. Essay e3",
    ]
    assert text.count("Read the essay: https://fieldnotes.example.org/essays/") == 3
    assert text.count("View comment: https://fieldnotes.example.org/essays/") == 3
    assert "> Comment 1 on e1: a thoughtful reply." in lines
    assert text.count("By Maren Holt · 3 November 2026") == 3
    assert "Welcome back.\n\nThree essays this week." in text
    assert "\n\n\n" not in text and text.endswith("\n")


def test_html_stays_one_byte_per_char_for_latin_prose_but_not_for_non_latin_text(
    make_draft: DraftFactory,
    essay_factory: Callable[..., Essay],
    comment_factory: Callable[..., RankedComment],
    newsletter: Newsletter,
    urls: dict[str, str],
) -> None:
    curly = make_draft(intro="It\u2019s here \u2014 the slow build.")
    compiled = compile_draft(curly, newsletter)
    assert all(max(part) <= "\xff" for part in compiled.html_parts)
    html, text = personalize(compiled, name="Zo\u00eb \u674e", **urls)
    assert max(html) <= "\xff"  # CPython keeps it at one byte per character
    assert "It&#8217;s here &#8212; the slow build." in html and "Hello Zo\u00eb &#26446;," in html
    assert "It\u2019s here \u2014 the slow build." in text and "Hello Zo\u00eb \u674e," in text

    # Mostly CJK: references would nearly triple the size (Gmail clips at 102 KB), so no.
    cjk = "\u65e5\u672c\u8a9e\u306e\u6587\u7ae0\u3067\u3059\u3002" * 40
    essay = essay_factory("jp", title="\u65e5\u672c\u8a9e", summary=f"<p>{cjk}</p>")
    comment = comment_factory("jp", 1, f"<p>{cjk}</p>")
    compiled = compile_draft(
        make_draft(items=(DraftItem(essay=essay, comments=(comment,)),)), newsletter
    )
    html = "".join(compiled.html_parts)
    assert cjk in html and "&#26085;" not in html


def test_dates_use_the_newsletter_time_zone(
    make_draft: DraftFactory, essay_factory: Callable[..., Essay], newsletter: Newsletter
) -> None:
    late = essay_factory(
        "late", published=datetime(2026, 11, 2, 23, 30, tzinfo=UTC)
    )  # Paris: 3 Nov
    compiled = compile_draft(make_draft(items=(DraftItem(essay=late),)), newsletter)
    assert "3 November 2026" in "".join(compiled.text_parts)


def test_unsafe_essay_urls_lose_their_links_and_comment_links_resolve(
    make_draft: DraftFactory,
    essay_factory: Callable[..., Essay],
    comment_factory: Callable[..., RankedComment],
    newsletter: Newsletter,
) -> None:
    essay = essay_factory("js", url="javascript:alert(1)", title="No link here")
    comment = comment_factory(
        "js", 1, '<p>see <a href="/other">other</a></p>', url="https://site.example/t/1#c1"
    )
    compiled = compile_draft(
        make_draft(items=(DraftItem(essay=essay, comments=(comment,)),)), newsletter
    )
    html = "".join(compiled.html_parts)
    assert "javascript:" not in html
    assert "No link here" in html and "Read the essay" not in html
    assert 'href="https://site.example/other"' in html


def test_missing_summary_falls_back_to_an_excerpt(
    make_draft: DraftFactory, essay_factory: Callable[..., Essay], newsletter: Newsletter
) -> None:
    body = "<p>" + " ".join(f"w{i}" for i in range(400)) + "</p><script>bad()</script>"
    essay = essay_factory("long", summary="", html=body)
    compiled = compile_draft(make_draft(items=(DraftItem(essay=essay),)), newsletter)
    text = "".join(compiled.text_parts)
    assert "w0 w1 w2" in text and "w399" not in text and "…" in text
    assert "bad()" not in "".join(compiled.html_parts)


def test_compiled_email_checks_its_shape() -> None:
    with pytest.raises(ValueError):
        CompiledEmail("s", "p", ("a", "b"), (), ("t",), ())
    with pytest.raises(ValueError):
        CompiledEmail("s", "p", ("a", "b"), ("bogus",), ("t",), ())


def _override(tmp_path: Path, name: str, content: str) -> str:
    (tmp_path / name).write_text(content)
    return str(tmp_path)


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("digest.mjml.j2", "<mjml>{% if %}</mjml>", r"digest\.mjml\.j2 line 1"),
        (
            "digest.mjml.j2",
            "<mjml><mj-body><mj-section>",
            r"MJML compile of digest\.mjml\.j2 failed",
        ),
        (
            "digest.mjml.j2",
            "not mjml at all {{ slots.unsubscribe_url }}",
            r"MJML compile of digest\.mjml\.j2",
        ),
        (
            "digest.mjml.j2",
            '<mjml><mj-body><mj-include path="/etc/passwd" /></mj-body></mjml>',
            "MJML compile",
        ),
        ("digest.mjml.j2", "{{ items | batch(-1) | list }}", r"digest\.mjml\.j2 failed"),
        (
            "digest.mjml.j2",
            "<mjml><mj-body><mj-section><mj-column><mj-text>hi</mj-text></mj-column></mj-section></mj-body></mjml>",
            r"digest\.mjml\.j2 has no unsubscribe_url",
        ),
        ("digest.txt.j2", "Hello {{ slots.name }}", r"digest\.txt\.j2 has no unsubscribe_url"),
        (
            "digest.txt.j2",
            "{{ slots.unsubscribe_url | upper }}",
            r"digest\.txt\.j2: a per-recipient slot marker",
        ),
        ("_head.mjml.j2", "{% for %}", r"_head\.mjml\.j2 line 1"),
    ],
)
def test_broken_override_templates_raise_render_error(
    tmp_path: Path,
    make_draft: DraftFactory,
    newsletter: Newsletter,
    name: str,
    content: str,
    message: str,
) -> None:
    with pytest.raises(RenderError, match=message):
        compile_draft(make_draft(), newsletter, templates_dir=_override(tmp_path, name, content))


def test_head_partial_without_final_newline_still_compiles(
    tmp_path: Path, make_draft: DraftFactory, newsletter: Newsletter
) -> None:
    # MRML rejects "</mj-attributes>  </mj-head>"; trim_blocks produces exactly that.
    folder = _override(
        tmp_path, "_head.mjml.j2", '<mj-attributes><mj-text color="#123456" /></mj-attributes>'
    )
    compiled = compile_draft(make_draft(), newsletter, templates_dir=folder)
    assert "color:#123456" in "".join(compiled.html_parts)


def test_render_error_is_a_digest_error_with_a_hint(
    tmp_path: Path, make_draft: DraftFactory, newsletter: Newsletter
) -> None:
    with pytest.raises(RenderError) as info:
        compile_draft(
            make_draft(),
            newsletter,
            templates_dir=_override(tmp_path, "digest.mjml.j2", "{% endif %}"),
        )
    assert info.value.hint and "templates" in info.value.hint
