"""The HTML allowlist, link rules, plain-text conversion and word counts."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from digest.render.sanitize import (
    ALLOWED_TAGS,
    clean_line,
    html_to_text,
    safe_url,
    sanitize_html,
    truncate_text,
    word_count,
)

BASE = "https://fieldnotes.example.org/essays/one"


@pytest.mark.parametrize(
    ("payload", "secret"),
    [
        ("<script>alert('SECRET')</script>", "SECRET"),
        ("<style>body{color:red} SECRET</style>", "SECRET"),
        ("<iframe src='https://evil.example'>SECRET</iframe>", "SECRET"),
        ("<svg><text>SECRET</text><script>x</script></svg>", "SECRET"),
        ("<math><mi>SECRET</mi></math>", "SECRET"),
        ("<object data='x'>SECRET</object><embed src='y'>", "SECRET"),
        ("<noscript>SECRET</noscript>", "SECRET"),
        ("<template><p>SECRET</p></template>", "SECRET"),
        ("<textarea>SECRET</textarea><select><option>SECRET</option></select>", "SECRET"),
        ("<button>SECRET</button>", "SECRET"),
    ],
)
def test_dangerous_elements_go_with_their_content(payload: str, secret: str) -> None:
    out = sanitize_html(f"<p>before</p>{payload}<p>after</p>")
    assert secret not in out
    assert "before" in out and "after" in out
    for tag in (
        "script",
        "style",
        "iframe",
        "svg",
        "math",
        "object",
        "embed",
        "template",
        "button",
    ):
        assert f"<{tag}" not in out


def test_forms_and_images_are_removed_but_prose_is_kept() -> None:
    out = sanitize_html(
        '<form action="https://evil.example/steal"><input name="pw" value="x">Type here</form>'
        '<img src="https://tracker.example/p.gif" alt="pixel" onerror="alert(1)">'
    )
    assert "<form" not in out and "<input" not in out and "<img" not in out
    assert "tracker.example" not in out and "evil.example" not in out
    assert "Type here" in out


def test_event_handlers_style_class_and_id_are_stripped() -> None:
    out = sanitize_html(
        '<p onclick="alert(1)" style="position:fixed" class="x" id="y">'
        '<a href="https://ok.example" onmouseover="alert(2)" style="color:red" target="_top">t</a>'
        '<span onload="z">s</span></p>'
    )
    assert "onclick" not in out and "onmouseover" not in out and "onload" not in out
    assert "style=" not in out and "class=" not in out and "id=" not in out and "target=" not in out
    assert '<a href="https://ok.example" rel="noopener noreferrer">t</a>' in out


@pytest.mark.parametrize(
    "href",
    [
        "javascript:alert(1)",
        "JaVaScRiPt:alert(1)",
        "java\tscript:alert(1)",
        " javascript:alert(1)",
        "&#106;avascript:alert(1)",
        "vbscript:msgbox(1)",
        "data:text/html;base64,PHNjcmlwdD5hbGVydCgxKTwvc2NyaXB0Pg==",
        "file:///etc/passwd",
        "ftp://files.example/x",
        "tel:+15555550100",
    ],
)
def test_only_http_https_and_mailto_links_survive(href: str) -> None:
    out = sanitize_html(f'<a href="{href}">click</a>', BASE)
    assert "href" not in out
    assert "click" in out


def test_allowed_schemes_are_kept() -> None:
    out = sanitize_html(
        '<a href="https://a.example/x?y=1&amp;z=2">a</a>'
        '<a href="http://b.example/">b</a><a href="mailto:ann@example.org">c</a>'
    )
    assert 'href="https://a.example/x?y=1&amp;z=2"' in out
    assert 'href="http://b.example/"' in out
    assert 'href="mailto:ann@example.org"' in out
    assert out.count('rel="noopener noreferrer"') == 3


def test_relative_links_resolve_against_the_base() -> None:
    out = sanitize_html('<a href="../two">x</a> <a href="/about">y</a> <a href="#c3">z</a>', BASE)
    assert 'href="https://fieldnotes.example.org/two"' in out
    assert 'href="https://fieldnotes.example.org/about"' in out
    assert 'href="https://fieldnotes.example.org/essays/one#c3"' in out


@pytest.mark.parametrize("base", [None, "", "not a url", "javascript:alert(1)", "/relative/base"])
def test_relative_links_are_dropped_without_a_usable_base(base: str | None) -> None:
    out = sanitize_html('<a href="/about">about</a>', base)
    assert "href" not in out
    assert "about" in out


def test_headings_are_downgraded_to_bold_paragraphs() -> None:
    out = sanitize_html("<h1>Big</h1><h3>Less</h3>", styles={"p": "margin:0;"})
    assert "<h1" not in out and "<h3" not in out
    assert (
        out
        == '<p style="margin:0;"><strong>Big</strong></p><p style="margin:0;"><strong>Less</strong></p>'
    )


def test_our_styles_replace_the_inputs() -> None:
    out = sanitize_html(
        '<blockquote style="background:url(https://t.example/x)">q</blockquote>',
        styles={"blockquote": "border-left:3px solid #ccc;"},
    )
    assert out == '<blockquote style="border-left:3px solid #ccc;">q</blockquote>'
    with pytest.raises(ValueError, match="img"):
        sanitize_html("<p>x</p>", styles={"img": "width:1px"})


def test_mjml_tags_never_survive() -> None:
    hostile = (
        '</mj-text><mj-raw><script>alert(1)</script></mj-raw><mj-button href="javascript:x">go'
        '</mj-button><mj-text>open</mj-text></mj-column></mj-section><mj-include path="/etc/passwd"/>'
    )
    out = sanitize_html(hostile)
    assert "<mj" not in out.lower() and "</mj" not in out.lower()
    assert "go" in out and "open" in out


def test_text_and_attributes_are_escaped() -> None:
    out = sanitize_html(
        '<p>1 &lt; 2 &amp;&amp; &lt;/mj-text&gt;</p><abbr title="a < b &quot;q&quot;">ab</abbr>'
    )
    assert "&lt;/mj-text&gt;" in out
    assert 'title="a &lt; b &quot;q&quot;"' in out


tag_names = st.sampled_from(
    sorted(ALLOWED_TAGS)
    + [
        "script",
        "style",
        "mj-text",
        "mj-raw",
        "MJ-TEXT",
        "svg",
        "img",
        "iframe",
        "x",
        "a href='javascript:1'",
    ]
)
fragments = st.lists(
    st.one_of(
        tag_names.map(lambda t: f"<{t}>"),
        tag_names.map(lambda t: f"</{t.split()[0]}>"),
        st.text(alphabet="<>&\"'=/ abc{}%!-\n\x00", max_size=12),
    ),
    max_size=30,
).map("".join)


@settings(max_examples=300, deadline=None)
@given(fragments)
def test_property_no_mjml_or_script_ever_escapes_the_sanitizer(html: str) -> None:
    out = sanitize_html(html)
    lowered = out.lower()
    assert "<mj" not in lowered and "</mj" not in lowered
    assert "<script" not in lowered and "<style" not in lowered and "<img" not in lowered
    assert "javascript:" not in lowered
    # Every remaining tag is from the allowlist.
    for tag in re.findall(r"</?([a-z0-9-]+)", out):
        assert tag in ALLOWED_TAGS - {"h1", "h2", "h3", "h4", "h5", "h6"}
    text = html_to_text(html)
    assert "<script" not in text.lower()
    assert "\x00" not in text


def test_html_to_text_structure() -> None:
    html = (
        "<h2>Heading</h2>"
        '<p>See <a href="https://x.example/a">the note</a>, '
        '<a href="https://y.example/">https://y.example/</a> and '
        '<a href="mailto:ann@example.org">ann@example.org</a>.<br>Second line &amp; more.</p>'
        "<blockquote><p>Quoted one.</p><p>Quoted two.</p></blockquote>"
        "<ul><li>first</li><li>second<ul><li>inner</li></ul></li></ul>"
        "<ol><li>one</li><li>two</li></ol>"
        "<pre>  keep\n    indent</pre>"
        "<script>alert('no')</script>"
    )
    assert html_to_text(html) == (
        "Heading\n\n"
        "See the note (https://x.example/a), https://y.example/ and ann@example.org.\n"
        "Second line & more.\n\n"
        "> Quoted one.\n>\n> Quoted two.\n\n"
        "- first\n- second\n  - inner\n\n"
        "1. one\n2. two\n\n"
        "  keep\n    indent"
    )


def test_html_to_text_resolves_relative_links_when_given_a_base() -> None:
    assert html_to_text('<a href="/x">x</a>', BASE) == "x (https://fieldnotes.example.org/x)"
    assert html_to_text('<a href="/x">x</a>') == "x"


@pytest.mark.parametrize(
    "hostile",
    [
        "<p><b><i>unclosed",
        "<<<>>>&&&;",
        "</p></p></blockquote></ul>",
        "<a href=",
        "\x00\x1b[31m\x07bell",
        "",
    ],
)
def test_html_to_text_copes_with_broken_input(hostile: str) -> None:
    text = html_to_text(hostile)
    assert not re.search(r"[\x00-\x08\x0b-\x1f\x7f]", text)


def test_word_count_counts_what_a_reader_sees() -> None:
    assert word_count('<p>Hello <a href="https://x.example/long/path">big</a> world</p>') == 3
    assert word_count("<p>It's well-known.</p><script>var a = 1; b c d</script>") == 2
    assert word_count("<p>one</p><p>two</p>") == 2
    assert word_count("") == 0


def test_safe_url() -> None:
    assert safe_url("https://a.example/x") == "https://a.example/x"
    assert safe_url("mailto:ann@example.org") == "mailto:ann@example.org"
    assert safe_url("java\nscript:alert(1)") == ""
    assert safe_url("data:text/html,x") == ""
    assert safe_url("/x", BASE) == "https://fieldnotes.example.org/x"
    assert safe_url("/x") == ""
    assert safe_url("https://") == ""


def test_clean_line_and_truncate() -> None:
    assert clean_line("Hi\r\nBcc: evil@example.org\x00\t ") == "Hi Bcc: evil@example.org"
    assert truncate_text("short", 140) == "short"
    cut = truncate_text("word " * 100, 40)
    assert len(cut) <= 40 and cut.endswith("…") and not cut.startswith(" ")
