"""Every command through click's runner, and the main ones through a real subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from digest.cli import cli

ROOT = Path(__file__).resolve().parent.parent


def config_file(tmp_path: Path, extra: str = "") -> Path:
    from digest.sources.folder import SAMPLE_DIR

    path = tmp_path / "config.yaml"
    path.write_text(
        f"""
database: {{url: "sqlite:///{tmp_path / 'd.db'}"}}
newsletter: {{public_url: https://news.example.org}}
sources:
  - {{name: sample, type: folder, path: "{SAMPLE_DIR}"}}
delivery: {{provider: outbox, outbox_dir: out}}
{extra}
""",
        encoding="utf-8",
    )
    return path


def invoke(*args: str, input: str | None = None) -> tuple[int, str]:
    result = CliRunner().invoke(cli, list(args), input=input, catch_exceptions=False)
    return result.exit_code, result.output


def test_help_lists_every_command() -> None:
    code, out = invoke("--help")
    assert code == 0
    for name in ("demo", "init", "check", "collect", "draft", "drafts", "preview", "approve", "reject",
                 "send", "run", "serve", "status", "subscribers", "db"):
        assert f"  {name}" in out


def test_the_whole_flow_through_the_runner(tmp_path: Path) -> None:
    cfg = str(config_file(tmp_path))
    assert invoke("--config", cfg, "db", "upgrade")[0] == 0
    code, out = invoke("--config", cfg, "subscribers", "add", "ann@example.com", "--name", "Ann")
    assert code == 0 and "added ann@example.com" in out
    csv_path = tmp_path / "subs.csv"
    csv_path.write_text("email,name\nbo@example.org,Bo\nbad-address,X\n")
    code, out = invoke("--config", cfg, "subscribers", "import", str(csv_path))
    assert code == 0 and "1 added" in out and "line 3:" in out
    code, out = invoke("--config", cfg, "collect")
    assert code == 0 and "sample: 4 new essays" in out
    code, out = invoke("--config", cfg, "draft")
    assert code == 0 and "draft 1 is ready for review" in out and "digest approve 1" in out
    code, out = invoke("--config", cfg, "drafts")
    assert "#1" in out and "pending_review" in out
    code, out = invoke("--config", cfg, "preview", "1", "--out", str(tmp_path / "pv"))
    assert code == 0 and (tmp_path / "pv" / "draft-1.html").exists()
    code, out = invoke("--config", cfg, "send", "--dry-run")
    assert "nothing to send" in out
    code, out = invoke("--config", cfg, "approve", "1")
    assert code == 0 and out == "draft 1 approved; the next `digest send` (or the service's next send) sends it\n"
    code, out = invoke("--config", cfg, "send", "--dry-run")
    assert code == 0 and "would send 2 in 1 batch," in out and ", built in " in out
    # What the send's pace will be: one call for the batch, at the outbox's default rate.
    assert "draft 1: 1 provider calls at most 50 a second (delivery.rate_per_second): the send takes at least 1s" in out
    code, out = invoke("--config", cfg, "send")
    assert code == 0 and "sent 2 in 1 batch," in out and "finished" in out
    assert "draft 1: batch 1 (2): 2/2 done — 2 sent, 0 failed, 0 uncertain" in out  # progress, on stderr
    assert len(list((tmp_path / "out" / "1").glob("*.eml"))) == 2
    code, out = invoke("--config", cfg, "send")
    assert "nothing to send" in out
    code, out = invoke("--config", cfg, "status")
    assert "sample: last fetch" in out and "#1 sent" in out and "sent 2, failed 0, uncertain 0" in out
    assert "Next runs:" in out
    code, out = invoke("--config", cfg, "subscribers", "export")
    assert out.splitlines()[0] == "email,name,status,created_at,unsubscribed_at" and "ann@example.com,Ann" in out
    code, out = invoke("--config", cfg, "subscribers", "remove", "ann@example.com")
    assert "removed ann@example.com" in out
    code, out = invoke("--config", cfg, "subscribers", "list", "--status", "active")
    assert "bo@example.org" in out and "ann@example.com" not in out


def test_reject_and_run(tmp_path: Path) -> None:
    cfg = str(config_file(tmp_path, "digest: {approval: {required: false}}"))
    code, out = invoke("--config", cfg, "subscribers", "add", "ann@example.com")
    code, out = invoke("--config", cfg, "run")
    assert code == 0 and "created and approved automatically" in out and "1 sent" in out
    code, out = invoke("--config", cfg, "reject", "1")
    assert code == 1 and out.startswith("error: draft 1 is sent")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("approve", "42"), "error: no draft with id 42"),
        (("approve", "1", "--at", "tomorrow"), "error: --at 'tomorrow' is not a time"),
        (("subscribers", "add", "nope"), "error: nope: "),
        (("send", "--resolve-uncertain", "resend", "--draft", "9"), "error: no draft with id 9"),
        (("send", "--retry-failed", "--draft", "9"), "error: no draft with id 9"),
        (("send", "--draft", "9"), "error: no draft with id 9"),
        (("status", "--draft", "9"), "error: no draft with id 9"),
    ],
)
def test_user_mistakes_print_one_line(tmp_path: Path, args: tuple[str, ...], message: str) -> None:
    cfg = str(config_file(tmp_path))
    code, out = invoke("--config", cfg, *args)
    assert code == 1
    assert out.startswith(message) and out.count("\n") == 1 and "Traceback" not in out


def test_reason_without_retry_failed_is_a_usage_error(tmp_path: Path) -> None:
    code, out = invoke("--config", str(config_file(tmp_path)), "send", "--reason", "HTTP 400")
    assert code == 2 and "--reason goes with --retry-failed" in out


def test_bad_config_prints_the_key(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("ranking:\n  per_esay: 3\n")
    code, out = invoke("--config", str(bad), "status")
    assert code == 1 and out == f"error: {bad}: ranking.per_esay: unknown key\n"


def test_init_writes_the_example_and_refuses_to_overwrite(tmp_path: Path) -> None:
    target = tmp_path / "config.yaml"
    code, out = invoke("init", str(target))
    assert code == 0 and target.read_text() == (ROOT / "config.example.yaml").read_text()
    code, out = invoke("init", str(target))
    assert code == 1 and "already exists" in out


def test_check_reports_each_part(tmp_path: Path) -> None:
    cfg = config_file(tmp_path)
    code, out = invoke("--config", str(cfg), "check")
    assert code == 0 and "source sample: ok (4 essays" in out and "provider outbox: ok" in out
    broken = config_file(tmp_path, "")
    broken.write_text(broken.read_text().replace(str(Path(__file__).parent.parent), "/nowhere"))
    code, out = invoke("--config", str(broken), "check")
    assert code == 1 and "source sample: FAILED" in out


@pytest.mark.parametrize(("faults", "ok"), [(2, True), (3, False)])
def test_check_asks_a_rate_limited_provider_again(tmp_path: Path, faults: int, ok: bool) -> None:
    """`digest check` asks a provider that answers 429 again, up to three calls in all, then
    reports the failure on one line. (Retry-After: 0, so the test does not wait.)"""
    from tests.fakes.provider_server import FakeProviderServer

    with FakeProviderServer(token="pm-token") as srv:
        cfg = config_file(tmp_path)
        cfg.write_text(cfg.read_text().replace(
            "delivery: {provider: outbox, outbox_dir: out}",
            f"delivery: {{provider: postmark, api_key: pm-token, base_url: '{srv.url}'}}"))
        srv.faults.extend([("status", 429, {"Retry-After": "0"})] * faults)
        code, out = invoke("--config", str(cfg), "check")
        assert len(srv.requests) == 3 and all(r.method == "GET" for r in srv.requests)
    (line,) = [line for line in out.splitlines() if line.startswith("provider postmark:")]
    if ok:
        assert code == 0 and line.startswith("provider postmark: ok (postmark: reached server")
    else:
        assert code == 1 and line == ("provider postmark: FAILED (postmark: HTTP 429 (rate limited); still "
                                      "failing after 3 attempts (try `digest check` again later))")


def test_demo_through_the_runner(tmp_path: Path) -> None:
    code, out = invoke("demo", "--dir", str(tmp_path / "demo"))
    assert code == 0
    assert "Collected 4 essays" in out and "Sent to 3 demo subscribers" in out
    assert (tmp_path / "demo" / "preview" / "draft-1.html").exists()
    emls = sorted((tmp_path / "demo" / "outbox").rglob("*.eml"))
    assert len(emls) == 3
    import email
    import email.policy

    msg = email.message_from_bytes(emls[0].read_bytes(), policy=email.policy.default)
    assert msg["List-Unsubscribe"].startswith("<https://")  # RFC 8058 wants https
    assert msg["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"


def run_cli(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "digest", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120, env={**os.environ, **(env or {})})


def test_demo_in_a_real_process_twice(tmp_path: Path) -> None:
    for _ in range(2):  # a rerun into the same folder starts fresh
        proc = run_cli("demo", "--dir", "demo-out", cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
        assert "HTML preview:" in proc.stdout
    assert len(list((tmp_path / "demo-out" / "outbox").rglob("*.eml"))) == 3


def test_commands_in_a_real_process_with_default_config_file(tmp_path: Path) -> None:
    config_file(tmp_path)
    for args, expect in ((("collect",), "4 new essays"), (("draft",), "ready for review"),
                         (("approve", "1"), "approved"), (("send",), "sent 0"), (("status",), "#1 sent")):
        proc = run_cli(*args, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
        assert expect in proc.stdout


def test_real_process_error_has_no_traceback(tmp_path: Path) -> None:
    proc = run_cli("--config", "missing.yaml", "status", cwd=tmp_path)
    assert proc.returncode == 1
    assert proc.stderr.strip() == "error: missing.yaml: config file not found (run `digest init` to write one)"


def test_every_command_is_in_the_readme() -> None:
    readme = (ROOT / "README.md").read_text()
    for name, command in cli.commands.items():
        if isinstance(command, type(cli)):  # a group: its subcommands count
            for sub in command.commands:
                assert f"digest {name} {sub}" in readme or f"{name} {sub}" in readme or (
                    f"digest {name} " in readme and sub in readme), f"`digest {name} {sub}` is not in the README"
        else:
            assert f"digest {name}" in readme, f"`digest {name}` is not in the README"


def test_approving_for_a_later_time_says_which_send_takes_it(tmp_path: Path) -> None:
    cfg = str(config_file(tmp_path))
    assert invoke("--config", cfg, "collect")[0] == 0
    assert invoke("--config", cfg, "draft")[0] == 0
    code, out = invoke("--config", cfg, "approve", "1", "--at", "2030-01-07T07:00")
    assert code == 0
    assert out.strip() == ("draft 1 approved; the first `digest send` from 2030-01-07 07:00 UTC on sends it "
                           "(digest.send_schedule, under `digest serve`)")
    code, out = invoke("--config", cfg, "send")
    assert code == 0 and "nothing to send" in out  # not before that time


def test_drafts_says_when_an_approved_draft_with_a_time_goes_out(tmp_path: Path) -> None:
    cfg = str(config_file(tmp_path))
    assert invoke("--config", cfg, "collect")[0] == 0
    assert invoke("--config", cfg, "draft")[0] == 0
    assert "sends from" not in invoke("--config", cfg, "drafts")[1]  # not approved yet
    assert invoke("--config", cfg, "approve", "1", "--at", "2030-01-07T08:00+01:00")[0] == 0
    code, out = invoke("--config", cfg, "drafts")
    (line,) = out.splitlines()
    assert code == 0 and line.startswith("#1    approved ")
    assert line.endswith("  sends from 2030-01-07 07:00 UTC")  # in newsletter.timezone


def test_send_says_which_drafts_their_approval_deadline_approved(tmp_path: Path) -> None:
    import time

    cfg = str(config_file(tmp_path, 'digest: {approval: {deadline: "1s", on_deadline: approve}}'))
    assert invoke("--config", cfg, "subscribers", "add", "ann@example.com")[0] == 0
    assert invoke("--config", cfg, "collect")[0] == 0
    assert invoke("--config", cfg, "draft")[0] == 0
    time.sleep(1.2)
    code, out = invoke("--config", cfg, "send", "--dry-run")  # says what the send will do, does nothing
    assert code == 0 and ("draft 1 was not reviewed before its approval deadline: the send approves and sends it "
                          "(digest.approval.on_deadline; this dry run leaves it as it is)") in out
    code, out = invoke("--config", cfg, "drafts")
    assert "pending_review" in out
    code, out = invoke("--config", cfg, "send")
    assert code == 0, out
    assert "draft 1 was not reviewed before its approval deadline: approved (digest.approval.on_deadline)" in out
    assert "draft 1: sent 1" in out


def test_status_tells_when_the_draft_last_ran_and_a_missed_run(tmp_path: Path) -> None:
    from datetime import UTC, datetime, timedelta

    from digest.store import open_store

    cfg = str(config_file(tmp_path))
    assert invoke("--config", cfg, "db", "upgrade")[0] == 0
    store = open_store(f"sqlite:///{tmp_path / 'd.db'}")
    store.record_run("draft", datetime.now(UTC) - timedelta(days=8))  # the weekly run since then was missed
    store.close()
    code, out = invoke("--config", cfg, "status")
    assert code == 0 and "(last run " in out
    assert "was missed: `digest serve` catches it up at start, or run `digest draft`" in out
    assert invoke("--config", cfg, "draft")[0] == 0
    code, out = invoke("--config", cfg, "status")
    assert "(last run " in out and "was missed" not in out


def test_two_collects_at_once_both_succeed_and_report_each_item_new_once(db_url: str, tmp_path: Path) -> None:
    """`digest collect` from cron while `digest serve` collects (or two services starting
    together) on one database: no traceback, and between them each item is reported new once."""
    import re
    import time

    from digest.sources.folder import SAMPLE_DIR
    from digest.store import open_store

    (tmp_path / "config.yaml").write_text(f"""
database: {{url: "{db_url}"}}
newsletter: {{public_url: https://news.example.org}}
sources: [{{name: sample, type: folder, path: "{SAMPLE_DIR}"}}]
delivery: {{provider: outbox, outbox_dir: out}}
""", encoding="utf-8")
    env = {"DIGEST_CONFIG": str(tmp_path / "config.yaml")}
    go = tmp_path / "go"
    # Each process waits, with what the collect imports loaded, until both can start it at once.
    code = ("import os, pathlib, sys, time\nimport markdown, digest.pipeline, digest.sources.registry\n"
            "from digest.cli import main\npathlib.Path(sys.argv[1]).touch()\n"
            f"while not os.path.exists({str(go)!r}): time.sleep(0.002)\n"
            "sys.argv = ['digest', 'collect']\nmain()\n")
    for _round in range(2):  # before the fix one of the two failed in about four rounds of five
        if db_url.startswith("sqlite"):
            path = Path(db_url.split("///", 1)[1])
            for leftover in path.parent.glob(path.name + "*"):
                leftover.unlink()
        else:
            from tests.conftest import _reset_pg

            _reset_pg(db_url)
        open_store(db_url).close()  # the schema: both commands find it ready
        ready = [tmp_path / f"ready{i}" for i in range(2)]
        for path in (go, *ready):
            path.unlink(missing_ok=True)
        procs = [subprocess.Popen([sys.executable, "-c", code, str(path)], cwd=tmp_path, env={**os.environ, **env},
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for path in ready]
        deadline = time.monotonic() + 60
        while not all(path.exists() for path in ready) and time.monotonic() < deadline:
            time.sleep(0.01)
        go.touch()
        outcomes = [p.communicate(timeout=120) for p in procs]
        assert [p.returncode for p in procs] == [0, 0], [err for _out, err in outcomes]
        assert not any("Traceback" in err for _out, err in outcomes), [err for _out, err in outcomes]
        new = [re.fullmatch(r"sample: (\d+) new essays, 0 updated; (\d+) new comments, 0 updated, 0 gone",
                            out.strip()) for out, _err in outcomes]
        assert all(new), [out for out, _err in outcomes]
        store = open_store(db_url)
        (status,) = store.source_statuses()
        store.close()
        assert status.essays == 4 and status.comments > 0
        assert sum(int(m.group(1)) for m in new if m) == status.essays
        assert sum(int(m.group(2)) for m in new if m) == status.comments


def test_resolving_every_draft_passes_over_one_being_sent(tmp_path: Path) -> None:
    """`--resolve-uncertain` without `--draft`: a draft another process is sending right now
    and that has nothing uncertain is no reason to stop; one with uncertain messages is named
    with how many were left, the rest go on, and the command exits 75 (run it again later; it
    exited 0 and said there were no uncertain messages to resolve)."""
    from datetime import UTC, datetime, timedelta

    from digest.store import open_store

    cfg = str(config_file(tmp_path))
    for step in (["subscribers", "add", "ann@example.com"], ["collect"], ["draft"], ["approve", "1"], ["send"]):
        assert invoke("--config", cfg, *step)[0] == 0
    store = open_store(f"sqlite:///{tmp_path / 'd.db'}")
    now = datetime.now(UTC)
    assert store.acquire_lease("send:1", "elsewhere:1:abc", now, now + timedelta(minutes=5))
    try:
        code, out = invoke("--config", cfg, "send", "--resolve-uncertain", "mark-sent")
        assert code == 0 and "no uncertain messages to resolve" in out
        ((ledger_id, _email, _status),) = store.ledger_rows(1)
        store.mark_uncertain([ledger_id], "read timeout", now)
        for how in ("mark-sent", "resend"):
            code, out = invoke("--config", cfg, "send", "--resolve-uncertain", how)
            assert code == 75
            assert out.startswith("1 uncertain messages in draft 1 not resolved: another process is sending it; "
                                  "run again once it has finished\n")
            assert "no uncertain messages" not in out
        assert store.ledger_counts(1) == {"uncertain": 1}
    finally:
        store.release_lease("send:1", "elsewhere:1:abc")
        store.close()
    code, out = invoke("--config", cfg, "send", "--resolve-uncertain", "mark-sent")
    assert code == 0 and "draft 1: 1 uncertain messages → mark-sent" in out


def test_a_send_paused_for_the_operator_through_the_cli(tmp_path: Path) -> None:
    """`digest send` pauses after batches refused for good and exits 1 (the operator is
    needed); run again (from cron) it passes the draft by, sending nothing; `digest status`
    shows why it waits, how many failed and what resumes it; `digest send --retry-failed
    --draft N` puts the failed back and sends everyone once."""
    from click.testing import CliRunner

    from tests.fakes.provider_server import FakeProviderServer
    from tests.test_e2e_postmark import TOKEN, cli_run, drafted, setup

    with FakeProviderServer(token=TOKEN) as srv:
        cfg = setup(tmp_path, srv.url, 20)  # five batches of four, one at a time
        cfg.write_text(cfg.read_text().replace("batch_size: 4,", "batch_size: 4, concurrency: 1,"))
        drafted(cfg, tmp_path)
        srv.faults.extend([("status", 400)] * 3)
        runner = CliRunner(env={"PM_TOKEN": TOKEN})
        for _ in range(2):  # the send that pauses, then cron's next
            result = runner.invoke(cli, ["--config", str(cfg), "send"])
            assert result.exit_code == 1, result.output
            assert ("draft 1: paused after 3 failed batches in a row, 12 messages in them refused for good "
                    "(the last: postmark: HTTP 400") in result.output
            assert "draft 1: 8 messages wait to be sent\n" in result.output
        assert len(srv.requests) == 3 and srv.messages == []
        status = cli_run(cfg, "status")
        assert "sent 0, failed 12 (12 failed), uncertain 0, pending 8" in status
        assert ("    waits for you since " in status and "paused after 3 failed batches in a row" in status
                and "`digest send --retry-failed --draft 1` puts the failed messages back" in status)
        assert "    12 failed (`digest status --draft 1` lists them):" in status
        out = cli_run(cfg, "send", "--retry-failed", "--reason", "HTTP 500", "--draft", "1")  # none such
        assert out == "no failed messages to retry in draft 1 whose error contains 'HTTP 500'\n"
        assert len(srv.requests) == 3 and "waits for you" in cli_run(cfg, "status")  # still paused
        out = cli_run(cfg, "send", "--retry-failed", "--reason", "http 400", "--draft", "1")
        assert "draft 1: 12 failed messages back in the queue\n" in out
        assert "sent 20 in 5 batches" in out and "finished" in out
        assert sorted(m["To"] for m in srv.messages) == sorted(f"R{i} <r{i}@example.com>" for i in range(20))
        status = cli_run(cfg, "status")
        assert "waits for you" not in status and "sent 20, failed 0" in status


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_a_database_from_a_newer_digest_says_to_upgrade_digest(tmp_path: Path) -> None:
    """`digest db upgrade` cannot take a database back to an older schema: every command,
    `db upgrade` too, says so on one line (it said to run `digest db upgrade`, which then
    failed with Alembic's traceback)."""
    import sqlite3

    from digest.store import db

    cfg = str(config_file(tmp_path))
    assert invoke("--config", cfg, "db", "upgrade")[0] == 0
    newer = f"{int(db.HEAD) + 1:04d}"
    with sqlite3.connect(tmp_path / "d.db") as conn:
        conn.execute("UPDATE alembic_version SET version_num = ?", (newer,))
    for args in (("status",), ("db", "upgrade"), ("send",)):
        code, out = invoke("--config", cfg, *args)
        assert code == 1
        assert out == (f"error: the database was written by a newer digest (schema {newer}; this digest knows "
                       f"up to {db.HEAD}): upgrade digest\n")


def _unreachable_databases(tmp_path: Path) -> list[tuple[str, str, str]]:
    """(database.url, what the line starts with, the hint) for databases that cannot be opened."""
    (tmp_path / "a-file").write_text("")
    (tmp_path / "a-folder.db").mkdir()
    port = _free_port()  # nothing listens there
    return [
        (f"postgresql+psycopg://postgres:s3cret@127.0.0.1:{port}/x",
         f'error: database postgresql+psycopg://postgres:***@127.0.0.1:{port}/x: connection failed: ',
         "(check database.url, and that the server is running)"),
        (f"sqlite:///{tmp_path / 'a-folder.db'}", f"error: database sqlite:///{tmp_path / 'a-folder.db'}: "
         "unable to open database file", "(check database.url, and that its folder is writable)"),
        (f"sqlite:///{tmp_path / 'a-file' / 'd.db'}", f"error: database.url: cannot create the folder "
         f"{tmp_path / 'a-file'}: File exists", "(check database.url, and that the folder can be made)"),
    ]


@pytest.mark.parametrize("command", [("db", "upgrade"), ("status",)])
def test_a_database_that_cannot_be_opened_is_one_line(tmp_path: Path, command: tuple[str, ...]) -> None:
    """PostgreSQL down, a SQLite file that cannot be opened or whose folder cannot be made: one
    line with what the driver said first and what to check (psycopg's advice and SQLAlchemy's
    link made it three; `db upgrade` showed a traceback), the password masked."""
    for url, start, hint in _unreachable_databases(tmp_path):
        cfg = config_file(tmp_path)
        cfg.write_text(cfg.read_text().replace(f"sqlite:///{tmp_path / 'd.db'}", url))
        result = CliRunner().invoke(cli, ["--config", str(cfg), *command])
        assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
        assert result.exit_code == 1
        assert result.output.startswith(start) and result.output.endswith(f" {hint}\n"), result.output
        assert result.output.count("\n") == 1 and "s3cret" not in result.output


def test_init_into_a_folder_it_cannot_write_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("")
    for target, reason in ((tmp_path / "missing" / "config.yaml", "No such file or directory"),
                           (tmp_path / "a-file" / "config.yaml", "Not a directory")):
        code, out = invoke("init", str(target))
        assert code == 1 and out == f"error: {target}: cannot write: {reason}\n"


@pytest.mark.parametrize("port", ["80000", "-1"])
def test_serve_refuses_a_port_out_of_range(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, port: str) -> None:
    """--port 80000 served on 14464 (80000 mod 65536); -1 failed with a traceback."""
    from digest import scheduler

    served: list[object] = []
    monkeypatch.setattr(scheduler, "serve", lambda *args, **kwargs: served.append(kwargs))
    code, out = invoke("--config", str(config_file(tmp_path)), "serve", "--web-only", "--port", port)
    assert code == 2 and f"Invalid value for '--port': {port} is not in the range 0<=x<=65535" in out
    assert served == []


@pytest.mark.parametrize(("listen", "args", "message"), [
    ("127.0.0.1:8097", ("--host", "256.1.1.1"), "error: --host: cannot listen on 256.1.1.1: not an IP address or a "
     "host name that resolves (use an address of this machine, e.g. 127.0.0.1)\n"),
    ("nosuch.invalid:8097", (), "error: web.listen: cannot listen on nosuch.invalid: not an IP address or a host "
     "name that resolves (use an address of this machine, e.g. 127.0.0.1)\n"),
])
def test_serve_on_a_host_that_is_no_address_is_one_line(tmp_path: Path, listen: str, args: tuple[str, ...],
                                                        message: str) -> None:
    cfg = str(config_file(tmp_path, f'web: {{listen: "{listen}"}}'))
    code, out = invoke("--config", cfg, "serve", "--web-only", *args)
    assert code == 1 and out == message


def test_retrying_every_draft_passes_over_one_being_sent(tmp_path: Path) -> None:
    """`--retry-failed` without `--draft`, while another process sends the draft: says how many
    failed messages were left and exits 75 (it said there were none to retry, and exited 0)."""
    import sqlite3
    from datetime import UTC, datetime, timedelta

    from digest.store import open_store

    cfg = str(config_file(tmp_path))
    for step in (["subscribers", "add", "ann@example.com"], ["collect"], ["draft"], ["approve", "1"], ["send"]):
        assert invoke("--config", cfg, *step)[0] == 0
    with sqlite3.connect(tmp_path / "d.db") as conn:
        conn.execute("UPDATE send_ledger SET status = 'failed', error = 'HTTP 400'")
    store = open_store(f"sqlite:///{tmp_path / 'd.db'}")
    now = datetime.now(UTC)
    assert store.acquire_lease("send:1", "elsewhere:1:abc", now, now + timedelta(minutes=5))
    try:
        code, out = invoke("--config", cfg, "send", "--retry-failed")
        assert code == 75
        assert out.startswith("1 failed messages in draft 1 not retried: another process is sending it; "
                              "run again once it has finished\n")
        assert "no failed messages" not in out
        assert store.ledger_counts(1) == {"failed": 1}
    finally:
        store.release_lease("send:1", "elsewhere:1:abc")
        store.close()
    code, out = invoke("--config", cfg, "send", "--retry-failed")
    assert code == 0 and "draft 1: 1 failed messages back in the queue" in out


@pytest.mark.parametrize(("newsletter", "key", "message"), [
    ('from: "Field Notes digest at example.org"', "newsletter.from",
     "'Field Notes digest at example.org' is not an address a send can use (not a single email address: 'Field'): "
     "write one such as \"Field Notes <digest@example.org>\""),
    ('from: "Field Notes <digest@>"', "newsletter.from",
     "'Field Notes <digest@>' is not an address a send can use (not an email address: 'Field Notes <digest@>'): "
     "write one such as \"Field Notes <digest@example.org>\""),
    ('from: "a@example.org, b@example.org"', "newsletter.from",
     "'a@example.org, b@example.org' is more than one address (write one)"),
    ('reply_to: "replies@"', "newsletter.reply_to",
     "'replies@' is not an address a send can use (not an email address: 'replies@'): "
     "write one such as \"Field Notes <digest@example.org>\""),
])
def test_check_refuses_a_from_address_every_send_would_refuse(tmp_path: Path, newsletter: str, key: str,
                                                              message: str) -> None:
    """`digest check` said ok (exit 0) to a From every send refuses; the first send stopped."""
    cfg = config_file(tmp_path)
    cfg.write_text(cfg.read_text().replace("newsletter: {public_url: https://news.example.org}",
                                           f"newsletter: {{public_url: https://news.example.org, {newsletter}}}"))
    code, out = invoke("--config", str(cfg), "check")
    assert code == 1 and out == f"error: {cfg}: {key}: {message}\n"


@pytest.mark.parametrize(("step", "message"), [
    ((), "error: draft 1 is pending review: approve it first (`digest approve 1`)\n"),
    (("reject", "1"), "error: draft 1 was rejected: it is not sent (`digest draft` makes the next one)\n"),
])
def test_sending_a_draft_that_cannot_be_sent_says_its_state_and_fails(tmp_path: Path, step: tuple[str, ...],
                                                                      message: str) -> None:
    """It said "nothing to send: draft 1 is not an approved, due draft or a send to resume" and
    exited 0: cron took the send for done."""
    cfg = str(config_file(tmp_path))
    for args in (("subscribers", "add", "ann@example.com"), ("collect",), ("draft",), step):
        if args:
            assert invoke("--config", cfg, *args)[0] == 0
    for dry_run in ((), ("--dry-run",)):
        code, out = invoke("--config", cfg, "send", "--draft", "1", *dry_run)
        assert code == 1 and out == message


@pytest.mark.parametrize(("approve", "message"), [
    (("approve", "1", "--at", "2030-01-07T07:00"), "nothing to send yet: draft 1 is approved for 2030-01-07 07:00 "
     "UTC; the first `digest send` from then sends it\n"),
    (("approve", "1"), "nothing to send: draft 1 is sent\n"),
])
def test_sending_a_draft_approved_for_later_or_sent_says_so(tmp_path: Path, approve: tuple[str, ...],
                                                             message: str) -> None:
    cfg = str(config_file(tmp_path))
    for args in (("subscribers", "add", "ann@example.com"), ("collect",), ("draft",), approve, ("send",)):
        assert invoke("--config", cfg, *args)[0] == 0
    code, out = invoke("--config", cfg, "send", "--draft", "1")
    assert code == 0 and out == message


def test_a_dry_run_of_resending_uncertain_messages_of_a_sent_draft_says_they_would_go(tmp_path: Path) -> None:
    """The real command puts them back and sends them; its dry run said "nothing to send"."""
    from datetime import UTC, datetime

    from digest.store import open_store

    cfg = str(config_file(tmp_path))
    emails = [f"r{i}@example.com" for i in range(20)]
    for args in (*(("subscribers", "add", e) for e in emails), ("collect",), ("draft",), ("approve", "1"),
                 ("send",)):
        assert invoke("--config", cfg, *args)[0] == 0
    store = open_store(f"sqlite:///{tmp_path / 'd.db'}")
    try:
        store.mark_uncertain([row[0] for row in store.ledger_rows(1)], "read timeout", datetime.now(UTC))
    finally:
        store.close()
    code, out = invoke("--config", cfg, "send", "--resolve-uncertain", "resend", "--dry-run", "--draft", "1")
    assert code == 0 and "nothing to send" not in out
    assert "draft 1: 20 uncertain messages → resend (dry run: left as they are)\n" in out
    assert ("draft 1: the send would send the 20 uncertain messages again (not built in a dry run: they stay "
            "uncertain until the real one)\n") in out
    code, out = invoke("--config", cfg, "send", "--resolve-uncertain", "resend", "--draft", "1")
    assert code == 0 and "draft 1: sent 20 in 1 batch," in out


def _interrupted_at(monkeypatch: pytest.MonkeyPatch, owner: type, method: str, call: int = 1) -> None:
    """A real SIGINT to this process (as Ctrl-C on the terminal sends) right after the ``call``-th
    call of ``owner.method``: the command's own handler (digest.cli._stop_on_signals) takes it."""
    import signal

    original = getattr(owner, method)
    calls = [0]

    def interrupting(self: object, *args: object, **kwargs: object) -> object:
        out = original(self, *args, **kwargs)
        calls[0] += 1
        if calls[0] == call:
            os.kill(os.getpid(), signal.SIGINT)
        return out

    monkeypatch.setattr(owner, method, interrupting)


def _approved(tmp_path: Path, readers: int) -> str:
    cfg = config_file(tmp_path)
    cfg.write_text(cfg.read_text().replace("outbox_dir: out}", "outbox_dir: out, batch_size: 2}"))
    (tmp_path / "subs.csv").write_text("email,name\n" + "".join(f"r{i}@example.com,R{i}\n" for i in range(readers)))
    for args in (("subscribers", "import", str(tmp_path / "subs.csv")), ("collect",), ("draft",), ("approve", "1")):
        assert invoke("--config", str(cfg), *args)[0] == 0
    return str(cfg)


@pytest.mark.parametrize("batch", [1, 3])
def test_a_dry_run_stopped_by_ctrl_c_exits_as_an_interrupted_send(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                  batch: int) -> None:
    """Ctrl-C during `digest send --dry-run` (in its first batch of three, or in its last): it
    says it was interrupted, with the counts so far, and exits 75 as an interrupted send does
    (it exited 0, as if the counts were whole)."""
    from digest.delivery.sender import Sender

    cfg = _approved(tmp_path, 5)
    _interrupted_at(monkeypatch, Sender, "_dry_batch", batch)
    code, out = invoke("--config", cfg, "send", "--dry-run")
    assert code == 75, out
    assert "stopping after the batches in flight" in out  # the handler's word, on stderr
    built = {1: "would send 2 in 1 batch,", 3: "would send 5 in 3 batches,"}[batch]
    assert f"draft 1: {built}" in out, out
    assert "draft 1: dry run interrupted (stopped on request): the counts cover the batches built so far\n" in out
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").glob("**/*.eml"))
    monkeypatch.undo()
    code, out = invoke("--config", cfg, "send", "--dry-run")  # not interrupted: whole, and 0
    assert code == 0 and "draft 1: would send 5 in 3 batches," in out and "interrupted" not in out


@pytest.mark.parametrize("dry_run", [True, False])
def test_a_send_stopped_before_its_draft_started_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         dry_run: bool) -> None:
    """Ctrl-C before the first draft was started: it said "nothing to send: no approved draft is
    due" and exited 0."""
    from digest.store.store import Store

    cfg = _approved(tmp_path, 3)
    _interrupted_at(monkeypatch, Store, "due_drafts")
    code, out = invoke("--config", cfg, "send", *(["--dry-run"] if dry_run else []))
    assert code == 75, out
    assert "nothing to send" not in out
    assert ("dry run interrupted (stopped on request) before any draft was built\n" if dry_run else
            "interrupted (stopped on request) before any draft was started: the next `digest send` (or the "
            "service's next send) sends what is due\n") in out
    monkeypatch.undo()
    code, out = invoke("--config", cfg, "send")
    assert code == 0 and "draft 1: sent 3 in 2 batches," in out
