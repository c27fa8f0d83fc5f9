"""`digest` sending through Postmark, against a local server that plays Postmark."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from click.testing import CliRunner

from digest.cli import cli
from tests.fakes.provider_server import FakeProviderServer

TOKEN = "server-token-123"


def setup(tmp_path: Path, url: str, subscribers: int) -> Path:
    from digest.sources.folder import SAMPLE_DIR

    cfg = tmp_path / "config.yaml"
    cfg.write_text(f"""
newsletter: {{public_url: "https://news.example.org", from: "Field Notes <digest@news.example.org>"}}
database: {{url: "sqlite:///{tmp_path / 'd.db'}"}}
sources: [{{name: sample, type: folder, path: "{SAMPLE_DIR}"}}]
digest: {{approval: {{required: false}}}}
delivery: {{provider: postmark, api_key: "${{PM_TOKEN}}", base_url: "{url}", batch_size: 4, max_retries: 3}}
""")
    (tmp_path / "subs.csv").write_text("email,name\n" + "".join(f"r{i}@example.com,R{i}\n" for i in range(subscribers)))
    return cfg


def drafted(cfg: Path, tmp_path: Path) -> None:
    """The subscribers imported, the sample collected, a draft made (and approved)."""
    cli_run(cfg, "subscribers", "import", str(tmp_path / "subs.csv"))
    cli_run(cfg, "collect")
    cli_run(cfg, "draft")


def cli_run(cfg: Path, *args: str) -> str:
    result = CliRunner(env={"PM_TOKEN": TOKEN}).invoke(cli, ["--config", str(cfg), *args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def test_send_through_postmark_once_with_faults(tmp_path: Path) -> None:
    with FakeProviderServer(token=TOKEN) as srv:
        cfg = setup(tmp_path, srv.url, 10)
        drafted(cfg, tmp_path)
        srv.faults.extend([("status", 500), ("status", 429, {"Retry-After": "0"})])
        srv.inactive.add("r3@example.com")
        out = cli_run(cfg, "send")
        assert "sent 9 in 3 batches, failed 1 suppressed" in out and "finished" in out
        assert ", uncertain 0, 2 retries, " in out  # the 500 and the 429, each tried again
        to = sorted(m["To"] for m in srv.messages)
        assert len(to) == len(set(to)) == 9 and "R3 <r3@example.com>" not in to
        first = srv.messages[0]
        headers = {h["Name"]: h["Value"] for h in first["Headers"]}
        assert headers["List-Unsubscribe"].startswith("<https://news.example.org/u/")
        assert headers["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
        assert first["MessageStream"] == "broadcast" and first["Metadata"]["ledger_id"]
        for m in srv.messages:  # each reader got their own greeting and their own links
            name = m["To"].split(" <")[0]
            assert f"Hello {name}," in m["TextBody"] and f"Hello {name}," in m["HtmlBody"]
            unsub = {h["Name"]: h["Value"] for h in m["Headers"]}["List-Unsubscribe"].strip("<>")
            assert unsub in m["HtmlBody"] and unsub in m["TextBody"]
        # Rerunning sends nothing more.
        assert "nothing to send" in cli_run(cfg, "send")
        assert len(srv.messages) == 9
        status = cli_run(cfg, "status")
        assert "sent 9, failed 1 (1 suppressed), uncertain 0" in status
        lines = status.splitlines()
        at = lines.index("    1 failed (`digest status --draft 1` lists them):")
        assert lines[at + 1].startswith("      1 since ") and ": suppressed: " in lines[at + 1]
        detail = cli_run(cfg, "status", "--draft", "1").splitlines()
        at = detail.index("    1 failed:")
        assert detail[at + 2:at + 4] == ["      they are:", "        r3@example.com (ledger 4)"]
        listing = cli_run(cfg, "subscribers", "list", "--status", "bounced")  # Postmark's inactive list
        assert "r3@example.com" in listing


def test_wrong_token_stops_with_one_clear_line(tmp_path: Path) -> None:
    with FakeProviderServer(token="the-right-one") as srv:
        cfg = setup(tmp_path, srv.url, 3)
        drafted(cfg, tmp_path)
        result = CliRunner(env={"PM_TOKEN": TOKEN}).invoke(cli, ["--config", str(cfg), "send"])
        assert result.exit_code == 1
        assert "refused the credentials" in result.output and "delivery.api_key" in result.output
        assert srv.messages == []


def test_an_account_refusal_stops_the_send_says_why_and_resumes_with_everyone(tmp_path: Path) -> None:
    with FakeProviderServer(token=TOKEN) as srv:
        cfg = setup(tmp_path, srv.url, 3)
        drafted(cfg, tmp_path)
        srv.faults.append(("status", 422, {}, {"ErrorCode": 412, "Message": "Your account is pending approval."}))
        result = CliRunner(env={"PM_TOKEN": TOKEN}).invoke(cli, ["--config", str(cfg), "send"])
        assert result.exit_code == 1
        assert "pending approval" in result.output and "messages wait to be sent" in result.output
        assert srv.messages == []
        status = cli_run(cfg, "status")
        assert "failed 0" in status and "stopped " in status and "pending approval" in status
        cli_run(cfg, "send")  # approved since
        assert sorted(m["To"] for m in srv.messages) == sorted(set(m["To"] for m in srv.messages))
        assert len(srv.messages) == 3
        assert "stopped " not in cli_run(cfg, "status")


def test_timeout_after_acceptance_is_uncertain_and_never_resent(tmp_path: Path) -> None:
    with FakeProviderServer(token=TOKEN) as srv:
        cfg = setup(tmp_path, srv.url, 4)
        cfg.write_text(cfg.read_text().replace("max_retries: 3", "max_retries: 3, timeout: 1.0"))
        drafted(cfg, tmp_path)
        srv.faults.append(("delay", 2.5))  # accepted, but the answer comes too late
        result = CliRunner(env={"PM_TOKEN": TOKEN}).invoke(cli, ["--config", str(cfg), "send"])
        out = result.output
        assert result.exit_code == 3  # finished, and uncertain messages wait for the operator
        assert "uncertain 4" in out and "4 messages may or may not have gone out" in out
        assert len(srv.messages) == 4
        assert "4 uncertain; resolve with" in cli_run(cfg, "status")
        cli_run(cfg, "send")
        assert len(srv.messages) == 4  # never resent silently
        cli_run(cfg, "send", "--resolve-uncertain", "mark-sent")
        assert "sent 4, failed 0, uncertain 0" in cli_run(cfg, "status")


def test_postmark_send_in_a_real_process(tmp_path: Path) -> None:
    with FakeProviderServer(token=TOKEN) as srv:
        cfg = setup(tmp_path, srv.url, 5)
        env = {**os.environ, "PM_TOKEN": TOKEN, "DIGEST_CONFIG": str(cfg)}
        for args in (["subscribers", "import", str(tmp_path / "subs.csv")], ["run"]):
            proc = subprocess.run([sys.executable, "-m", "digest", *args], env=env, capture_output=True,
                                  text=True, timeout=120)
            assert proc.returncode == 0, proc.stderr
        assert "5 sent" in proc.stdout
        assert sorted(m["To"] for m in srv.messages) == [f"R{i} <r{i}@example.com>" for i in range(5)]


def test_a_send_paused_by_an_outage_exits_75_and_the_next_send_finishes(tmp_path: Path) -> None:
    """Exit codes tell cron and systemd what happened: 75 (try again later) when the provider
    kept failing and the send paused, 0 once the next send has delivered everyone."""
    with FakeProviderServer(token=TOKEN) as srv:
        cfg = setup(tmp_path, srv.url, 8)
        cfg.write_text(cfg.read_text().replace("max_retries: 3", "max_retries: 0"))
        drafted(cfg, tmp_path)
        srv.faults.extend([("status", 500)] * 2)  # each of the two batches of 4 meets one
        result = CliRunner(env={"PM_TOKEN": TOKEN}).invoke(cli, ["--config", str(cfg), "send"])
        assert result.exit_code == 75, result.output
        assert "kept failing" in result.output and "draft 1: 8 messages wait to be sent\n" in result.output
        assert srv.messages == []
        srv.faults.clear()
        out = cli_run(cfg, "send")
        assert "sent 8 in 2 batches" in out and "finished" in out
        assert sorted(m["To"] for m in srv.messages) == sorted(f"R{i} <r{i}@example.com>" for i in range(8))


def test_resolving_uncertain_messages_of_a_draft_does_not_resume_a_send_that_waits_for_the_operator(
        tmp_path: Path) -> None:
    """Three batches refused for good: the send waits for the operator. `digest send
    --resolve-uncertain resend --draft 1` (what the advice for uncertain messages says) fixes
    nothing of that, so it sends no batch; `digest send --draft 1` alone resumes."""
    with FakeProviderServer(token=TOKEN) as srv:
        cfg = setup(tmp_path, srv.url, 20)
        cfg.write_text(cfg.read_text().replace("batch_size: 4,", "batch_size: 4, concurrency: 1,"))
        drafted(cfg, tmp_path)
        srv.faults.extend([("status", 400)] * 3)
        runner = CliRunner(env={"PM_TOKEN": TOKEN})
        result = runner.invoke(cli, ["--config", str(cfg), "send"])
        assert result.exit_code == 1 and "paused after 3 failed batches" in result.output
        assert len(srv.requests) == 3
        result = runner.invoke(cli, ["--config", str(cfg), "send", "--resolve-uncertain", "resend", "--draft", "1"])
        assert "no uncertain messages to resolve in draft 1" in result.output
        print(result.output)
        assert result.exit_code == 1 and "--retry-failed --draft 1" in result.output  # still waits
        assert len(srv.requests) == 3  # no batch went out
        assert "--retry-failed --draft 1" in cli_run(cfg, "status")
        result = runner.invoke(cli, ["--config", str(cfg), "send", "--draft", "1"])
        assert result.exit_code == 0, result.output
        assert len(srv.requests) == 3 + 2  # the 8 readers the refusals did not reach
