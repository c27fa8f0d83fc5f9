"""The template environment: lookup order, escaping rules, strictness, filters."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from digest.config import Newsletter
from digest.errors import RenderError
from digest.render import compile_draft, personalize
from digest.render.env import bundled_templates_dir, longdate, make_env, quote_lines
from digest.types import Draft

DraftFactory = Callable[..., Draft]


def test_bundled_templates_are_found() -> None:
    folder = bundled_templates_dir()
    for name in ("digest.mjml.j2", "digest.txt.j2", "draft_ready.mjml.j2", "draft_ready.txt.j2"):
        assert (folder / name).is_file(), name


def test_mjml_templates_are_autoescaped_and_text_templates_are_not(tmp_path: Path) -> None:
    (tmp_path / "probe.mjml.j2").write_text("{{ v }}")
    (tmp_path / "probe.html").write_text("{{ v }}")
    (tmp_path / "probe.txt.j2").write_text("{{ v }}")
    (tmp_path / "probe.unknown").write_text("{{ v }}")
    env = make_env(tmp_path)
    value = '</mj-text><b>"&"</b>'
    escaped = "&lt;/mj-text&gt;&lt;b&gt;&#34;&amp;&#34;&lt;/b&gt;"
    assert env.get_template("probe.mjml.j2").render(v=value) == escaped
    assert env.get_template("probe.html").render(v=value) == escaped
    assert env.get_template("probe.unknown").render(v=value) == escaped  # unknown → escape
    assert env.get_template("probe.txt.j2").render(v=value) == value


def test_user_data_is_never_evaluated_as_a_template(tmp_path: Path) -> None:
    (tmp_path / "probe.mjml.j2").write_text("{{ v }}")
    out = (
        make_env(tmp_path)
        .get_template("probe.mjml.j2")
        .render(v="{{ 7 * 7 }}{% if true %}yes{% endif %}")
    )
    assert out == "{{ 7 * 7 }}{% if true %}yes{% endif %}"


def test_override_folder_wins_file_by_file(
    tmp_path: Path, make_draft: DraftFactory, newsletter: Newsletter, urls: dict[str, str]
) -> None:
    # Only the text part is overridden; the HTML part must still come from the bundle.
    (tmp_path / "digest.txt.j2").write_text(
        "CUSTOM TEXT for {{ slots.name }}: {{ items | length }} essays\nUnsubscribe: {{ slots.unsubscribe_url }}\n"
    )
    compiled = compile_draft(make_draft(), newsletter, templates_dir=str(tmp_path))
    html, text = personalize(compiled, name="Ann", **urls)
    assert text == f"CUSTOM TEXT for Ann: 3 essays\nUnsubscribe: {urls['unsubscribe_url']}\n"
    assert "What readers said" in html and "CUSTOM" not in html

    # An override partial is picked up by a bundled template that includes it.
    (tmp_path / "_head.mjml.j2").write_text(
        '<mj-attributes><mj-text color="#123456" /></mj-attributes>'
    )
    html2, _ = personalize(
        compile_draft(make_draft(), newsletter, templates_dir=str(tmp_path)), name="Ann", **urls
    )
    assert "color:#123456" in html2 and "color:#123456" not in html


def test_strict_undefined_in_an_override_is_a_render_error(
    tmp_path: Path, make_draft: DraftFactory, newsletter: Newsletter
) -> None:
    (tmp_path / "digest.txt.j2").write_text("{{ slots.unsubscribe_url }} {{ no_such_variable }}")
    with pytest.raises(RenderError, match=r"digest\.txt\.j2.*no_such_variable"):
        compile_draft(make_draft(), newsletter, templates_dir=str(tmp_path))


def test_missing_override_folder_is_a_render_error(
    tmp_path: Path, make_draft: DraftFactory, newsletter: Newsletter
) -> None:
    with pytest.raises(RenderError, match="does not exist"):
        compile_draft(make_draft(), newsletter, templates_dir=str(tmp_path / "nope"))


def test_longdate() -> None:
    assert longdate(datetime(2026, 11, 3, 9, tzinfo=UTC)) == "3 November 2026"
    late = datetime(2026, 11, 2, 23, 30, tzinfo=UTC)
    assert longdate(late, ZoneInfo("Europe/Paris")) == "3 November 2026"
    assert longdate(late, ZoneInfo("America/New_York")) == "2 November 2026"
    assert longdate(None) == ""


def test_quote_lines() -> None:
    assert quote_lines("a\n\nb") == "> a\n>\n> b"
