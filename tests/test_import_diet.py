"""What a sending process imports. Memory should grow with the batch, not with the code loaded:
the send path must not import the web app, the collectors, the scheduler, the migrations,
the subscriber import or the renderer (each check runs in a fresh interpreter, since this one
has them all)."""

from __future__ import annotations

import email
import email.policy
import json
import subprocess
import sys
from pathlib import Path

from click.testing import CliRunner

from digest import pipeline
from digest.cli import cli

ROOT = Path(__file__).resolve().parent.parent

# Never needed to send: the web app and its server, the webhook signature checks, feed and
# Markdown parsing, migrations, subscriber address validation, test tooling.
NEVER_ON_SEND = ("flask", "werkzeug", "waitress", "cryptography", "feedparser", "markdown", "alembic",
                 "email_validator", "hypothesis", "digest.web", "digest.subscribers", "digest.jobs")
# Also absent from a process that only imports the send path. `digest send` loads these while
# it validates the config file (cron schedules, each source's settings).
NOT_IMPORTED_TO_SEND = ("apscheduler", "yaml", "digest.scheduler", "digest.sources")
# The renderer: a draft is compiled when it is made, and a send loads that result (it compiles
# only when the templates or settings changed since). Ranking uses the sanitizer, so it goes too.
RENDERER = ("jinja2", "markupsafe", "mjml", "nh3", "digest.render.compose", "digest.render.env",
            "digest.render.sanitize", "digest.ranking")
# On SQLite, SQLAlchemy's PostgreSQL dialect (2 MB) has nothing to do.
POSTGRESQL = ("sqlalchemy.dialects.postgresql", "psycopg")


def _digest_send(config: Path) -> str:
    """Code that runs `digest --config CONFIG send` as the command line does, and fails on a
    non-zero exit."""
    return f"""
import sys
from digest.cli import main
sys.argv = ["digest", "--config", {str(config)!r}, "send"]
try:
    main()
except SystemExit as exc:
    assert not exc.code, exc.code
"""


def _loaded(code: str, cwd: Path = ROOT) -> set[str]:
    """The top-level packages and ``digest.*`` modules in ``sys.modules`` after running ``code``."""
    script = code + "\nimport json, sys\nprint('MODULES ' + json.dumps(sorted(sys.modules)))\n"
    proc = subprocess.run([sys.executable, "-c", script], cwd=cwd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    line = next(x for x in proc.stdout.splitlines() if x.startswith("MODULES "))
    names = json.loads(line.removeprefix("MODULES "))
    return {n for n in names if n.startswith("digest.")} | {n.split(".")[0] for n in names}


def _present(loaded: set[str], forbidden: tuple[str, ...]) -> list[str]:
    return [f for f in forbidden if f in loaded or any(m.startswith(f + ".") for m in loaded)]


def test_importing_the_send_path_loads_only_what_sending_needs() -> None:
    loaded = _loaded("from digest import pipeline\nfrom digest.delivery import sender\n"
                     "from digest.render import CompiledEmail, personalize, slot_values\n"
                     "from digest.store import open_store")
    assert _present(loaded, NEVER_ON_SEND + NOT_IMPORTED_TO_SEND + RENDERER + POSTGRESQL) == []
    # What it does need, so that this test notices if the imports above stop meaning anything.
    assert {"digest.delivery.sender", "digest.render", "digest.store", "sqlalchemy", "requests", "pydantic"} <= loaded


def test_digest_send_from_start_to_finish_loads_no_collecting_or_web_code(tmp_path: Path) -> None:
    from digest.sources.folder import SAMPLE_DIR

    base = f"""
database: {{url: "sqlite:///{tmp_path / 'd.db'}"}}
newsletter: {{public_url: https://news.example.org}}
digest: {{approval: {{required: false}}}}
delivery: {{provider: outbox, outbox_dir: out}}
sources:
  - {{name: sample, type: folder, path: "{SAMPLE_DIR}"}}
"""
    setup = tmp_path / "setup.yaml"
    setup.write_text(base, encoding="utf-8")
    for args in (["db", "upgrade"], ["subscribers", "add", "ann@example.com"], ["collect"], ["draft"]):
        result = CliRunner().invoke(cli, ["--config", str(setup), *args], catch_exceptions=False)
        assert result.exit_code == 0, result.output
    # The config `digest send` reads also names a feed with comment sources: validating it
    # imports those source modules, and must not pull in their parsers.
    send_config = tmp_path / "send.yaml"
    send_config.write_text(base + """
  - name: blog
    type: feed
    url: https://blog.example.org/feed.xml
    comments:
      - {type: discourse, base_url: "https://forum.example.org"}
""", encoding="utf-8")
    loaded = _loaded(_digest_send(config=send_config), cwd=tmp_path)
    assert len(list((tmp_path / "out").rglob("*.eml"))) == 1  # it did send
    # `digest draft` compiled the draft and stored it; the send loaded that.
    assert _present(loaded, NEVER_ON_SEND + RENDERER + POSTGRESQL) == []


def test_a_send_compiles_again_when_the_templates_changed_since_the_draft(tmp_path: Path) -> None:
    """The same stored draft, but an override template added after it was made: the send
    compiles (and so loads the renderer) and sends what the new template makes."""
    from digest.sources.folder import SAMPLE_DIR

    (tmp_path / "templates").mkdir()
    config = tmp_path / "config.yaml"
    config.write_text(f"""
database: {{url: "sqlite:///{tmp_path / 'd.db'}"}}
newsletter: {{public_url: https://news.example.org}}
digest: {{approval: {{required: false}}}}
delivery: {{provider: outbox, outbox_dir: out}}
templates: templates
sources:
  - {{name: sample, type: folder, path: "{SAMPLE_DIR}"}}
""", encoding="utf-8")
    for args in (["subscribers", "add", "ann@example.com"], ["collect"], ["draft"]):
        result = CliRunner().invoke(cli, ["--config", str(config), *args], catch_exceptions=False)
        assert result.exit_code == 0, result.output
    (tmp_path / "templates" / "digest.txt.j2").write_text(
        "A new text part for {{ slots.name }}.\nUnsubscribe: {{ slots.unsubscribe_url }}\n", encoding="utf-8")
    loaded = _loaded(_digest_send(config=config), cwd=tmp_path)
    assert {"jinja2", "mjml", "digest.render.compose"} <= loaded
    (eml,) = (tmp_path / "out").rglob("*.eml")
    message = email.message_from_bytes(eml.read_bytes(), policy=email.policy.default)
    plain = message.get_body(("plain",))
    assert plain is not None and plain.get_content().startswith("A new text part for reader.")


def test_lazily_loaded_pipeline_names_stay_importable() -> None:
    from digest.pipeline import build_comment_sources, build_source, comment_blocks, next_run, previous_run
    from digest.scheduler import next_run as scheduler_next_run
    from digest.sources import registry

    assert (build_source, build_comment_sources, comment_blocks) == (
        registry.build_source, registry.build_comment_sources, registry.comment_blocks)
    assert next_run is scheduler_next_run and callable(previous_run)
    assert pipeline.subscribers.normalize_email("Ann@Example.com") == "ann@example.com"
