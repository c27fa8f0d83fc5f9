"""kill -9 in the middle of a send, then restart: nobody gets two copies (rule 1). The kills run
on SQLite and on PostgreSQL (``db_url``)."""

from __future__ import annotations

import collections
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from email.utils import parseaddr
from pathlib import Path
from typing import Any

import pytest

from digest.store import open_store
from tests.delivery.test_smtp import plain
from tests.fakes.provider_server import FakeProviderServer, install_mailgun, install_sendgrid, install_ses

TOKEN = "crash-token"


def _prepare(tmp_path: Path, srv: FakeProviderServer, emails: list[str], delivery: str,
             db_url: str | None = None) -> tuple[dict[str, str], list[str], str]:
    """A config for the fake server (``delivery`` holds the provider's keys), the subscribers,
    a collected and approved draft; returns the environment, the command and the database's
    URL (``db_url``, else an SQLite file).

    The preparation runs here, not as three more ``digest`` processes (a second or two each
    on a busy machine): only the send is killed."""
    from digest import config, pipeline
    from digest.sources.folder import SAMPLE_DIR

    db = db_url or f"sqlite:///{tmp_path / 'd.db'}"
    cfg = tmp_path / "config.yaml"
    cfg.write_text(f"""
database: {{url: "{db}"}}
newsletter: {{public_url: "https://news.example.org"}}
sources: [{{name: sample, type: folder, path: "{SAMPLE_DIR}"}}]
digest: {{approval: {{required: false}}}}
delivery: {{api_key: "{TOKEN}", base_url: "{srv.url}", batch_size: 5, max_retries: 0, {delivery}}}
""")
    app = pipeline.App.open(config.load(cfg))
    try:
        app.store.upsert_subscribers([(e, "") for e in emails], "import", app.now())
        pipeline.collect(app)
        assert pipeline.make_draft(app).draft is not None
    finally:
        app.close()
    env = {**os.environ, "DIGEST_CONFIG": str(cfg)}
    return env, [sys.executable, "-m", "digest"], db


def _wait_for(condition: Callable[[], bool], what: str, seconds: float = 60) -> None:
    """Poll until ``condition`` holds (the state it names, not a moment: no race)."""
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


@dataclass(frozen=True)
class Kill:
    """How a provider's send is stopped mid-flight, deterministically.

    ``delivery`` is its YAML; ``hold`` arranges for the fake to hold calls from some point
    on (answering none of them) and returns a function saying how many calls are held;
    ``held`` calls held mean every worker is blocked in one, with ``batches`` batches claimed
    and unsettled, and no other.
    """

    delivery: str
    install: Callable[[FakeProviderServer], None]
    hold: Callable[[FakeProviderServer, Any, threading.Event], Callable[[], int]]
    held: int
    batches: int  # batches in flight when ``held`` calls are
    # A batch is several calls (one per message), recorded call by call: only the held calls'
    # messages are uncertain after the kill, the rest of their batch is sent or sent again.
    per_call: bool = False


def _hold_http(passed: int, held: int) -> Callable[[FakeProviderServer, Any, threading.Event], Callable[[], int]]:
    """Let ``passed`` calls through, then hold the next ``held``."""
    def arrange(srv: FakeProviderServer, smtp: Any, gate: threading.Event) -> Callable[[], int]:
        srv.faults.extend([("pass",)] * passed + [("hold", gate)] * held)
        return lambda: len(srv.held)
    return arrange


def _hold_smtp(address: str) -> Callable[[FakeProviderServer, Any, threading.Event], Callable[[], int]]:
    """Queue the message to ``address`` but answer its DATA only once released."""
    def arrange(srv: FakeProviderServer, smtp: Any, gate: threading.Event) -> Callable[[], int]:
        smtp.handler.hold_after_data.add(address)
        smtp.handler.released = gate
        return lambda: len(smtp.handler.held)
    return arrange


KILLED = [f"k{i:03d}@example.com" for i in range(40)]  # 8 batches of 5
KILLS = {
    # One call per batch, two workers: the 5th and 6th calls are held, one per worker.
    "postmark": Kill("provider: postmark, concurrency: 2", lambda srv: None, _hold_http(4, 2), 2, 2),
    # The same through a server template: its creation is one call before the first batch.
    "postmark-templates": Kill("provider: postmark, postmark_templates: true, concurrency: 2", lambda srv: None,
                               _hold_http(5, 2), 2, 2),
    "sendgrid": Kill("provider: sendgrid, concurrency: 2", install_sendgrid, _hold_http(4, 2), 2, 2),
    "mailgun": Kill("provider: mailgun, domain: mg.example.org, concurrency: 2",
                    lambda srv: install_mailgun(srv, "mg.example.org"), _hold_http(4, 2), 2, 2),
    # One call per message, two at a time within a batch: the first two batches' ten calls
    # and one of the third's are answered, the next two held (of batch 11-15, 11-13 went out).
    "ses": Kill(f"provider: ses, region: us-east-1, aws_access_key_id: AKIDEXAMPLE, "
                f"aws_secret_access_key: {TOKEN}, concurrency: 2, rate_per_second: 500",
                lambda srv: install_ses(srv, secret_key=TOKEN), _hold_http(11, 2), 2, 1, per_call=True),
    # One session per batch, one worker: the second message of the third batch is held.
    "smtp": Kill("provider: smtp, smtp_host: 127.0.0.1, smtp_security: none, concurrency: 1",
                 lambda srv: None, _hold_smtp(KILLED[11]), 1, 1, per_call=True),
}


@pytest.mark.parametrize("provider", sorted(KILLS))
def test_sigkill_mid_send_then_restart_never_sends_twice(tmp_path: Path, servers: list[Any], provider: str,
                                                         db_url: str) -> None:
    """kill -9 while calls are held unanswered at the provider, then restart: exactly the
    messages in flight are uncertain (a batch of one call: all of it; for SES and SMTP, whose
    batch is several calls recorded one by one, the held calls' messages only: those answered
    before are sent, those never started go out after the restart), nobody gets two copies,
    everyone else is sent once; ``--resolve-uncertain mark-sent`` then sends nothing more and
    leaves everyone with exactly one copy."""
    kill = KILLS[provider]
    emails = KILLED
    with FakeProviderServer(token=TOKEN) as srv:
        kill.install(srv)
        smtp = plain(servers) if provider == "smtp" else None
        port = f", smtp_port: {smtp.port}" if smtp is not None else ""
        env, run, db = _prepare(tmp_path, srv, emails, kill.delivery + port, db_url)
        gate = threading.Event()
        held = kill.hold(srv, smtp, gate)

        def received() -> collections.Counter[str]:
            if smtp is not None:
                return collections.Counter(r.rcpt_tos[0] for r in smtp.handler.received)
            return collections.Counter(parseaddr(m.get("To") or m["to"])[1] for m in srv.messages)

        proc = subprocess.Popen([*run, "send"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            _wait_for(lambda: held() == kill.held or proc.poll() is not None, "the calls to be held")
            assert proc.poll() is None, proc.communicate()
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=10)
        finally:
            proc.kill()  # (a no-op once it has exited)
            gate.set()  # the held calls answer a client that is gone
        assert proc.returncode == -signal.SIGKILL
        before = received()
        srv.faults.clear()

        store = open_store(db)
        ids = {email: ledger_id for ledger_id, email, _st in store.ledger_rows(1)}
        store.close()
        # The batches in flight: those of the held calls (claims are runs of 5 ledger ids).
        first = min(ids.values())
        held_ids = ({i for r in srv.held for i in r.ledger_ids} if smtp is None
                    else {ids[a] for a in smtp.handler.held})
        blocks = {(i - first) // 5 for i in held_ids}
        in_flight = {e for e, i in ids.items() if (i - first) // 5 in blocks}
        assert len(blocks) == kill.batches and len(in_flight) == 5 * kill.batches
        held_emails = {e for e, i in ids.items() if i in held_ids}
        assert len(held_emails) == (kill.held if kill.per_call else len(in_flight))  # (a message per call)
        uncertain = held_emails if kill.per_call else in_flight
        # Before the kill, every batch claimed was handed over once: all of those answered,
        # and of those in flight what the held calls (and, in their batch, the calls
        # answered before them) carried.
        assert set(before.values()) == {1}
        claimed = {e for e, i in ids.items() if (i - first) // 5 <= max(blocks)}
        assert set(before) - in_flight == claimed - in_flight

        again = subprocess.run([*run, "send"], env=env, capture_output=True, text=True, timeout=60)
        # Finished, exit 3: the killed sender's batches in flight wait for the operator.
        assert again.returncode == 3, again.stdout + again.stderr
        assert "messages were in flight when a sender stopped; marked uncertain" in again.stdout
        status = subprocess.run([*run, "status"], env=env, capture_output=True, text=True, check=True).stdout
        assert f"{len(uncertain)} uncertain; resolve with" in status

        counts = received()
        assert set(counts.values()) == {1}, "someone got two copies"
        store = open_store(db)
        by_status: dict[str, set[str]] = collections.defaultdict(set)
        for _id, email, st in store.ledger_rows(1):
            by_status[st].add(email)
        store.close()
        assert by_status.keys() == {"sent", "uncertain"}
        assert by_status["uncertain"] == uncertain  # exactly the messages in flight
        assert by_status["sent"] == set(emails) - uncertain == set(counts) - uncertain
        # The provider got the uncertain messages once, before the kill (the held calls).
        assert set(counts) & uncertain == set(before) & uncertain == uncertain

        # The operator checks the provider's log and marks them sent: nothing more goes out.
        subprocess.run([*run, "send", "--resolve-uncertain", "mark-sent"], env=env, check=True, capture_output=True)
        assert received() == counts
        store = open_store(db)
        assert {st for _id, _email, st in store.ledger_rows(1)} == {"sent"}
        store.close()
        assert counts == collections.Counter(emails)  # everyone exactly once
        if kill.per_call:
            # In the killed batch: the calls answered before the held ones were recorded sent,
            # and those never started went out after the restart, not uncertain with the rest.
            killed_batch = sorted(in_flight)
            assert killed_batch == KILLED[10:15]
            # (Which of SES's two calls at a time is held depends on which request reaches the
            # fake first: held_emails says.)
            assert len(uncertain) == kill.held and uncertain <= set(killed_batch)
            assert sorted(uncertain) == KILLED[11:12] or provider == "ses"
            assert set(KILLED[13:15]) <= set(counts) - set(before)  # sent by the restart


def test_sigkill_mid_send_through_resend_resends_in_flight_batches_safely(tmp_path: Path, db_url: str) -> None:
    """With Resend's idempotency keys a restart settles in-flight batches by itself: the same
    batch, byte for byte, under the same key; the provider answers it without sending again."""
    emails = [f"k{i:03d}@example.com" for i in range(60)]
    with FakeProviderServer(token=TOKEN) as srv:
        from tests.fakes.provider_server import install_resend

        install_resend(srv)
        env, run, db = _prepare(tmp_path, srv, emails, "provider: resend", db_url)
        srv.faults.extend([("delay", 0.25)] * 40)
        proc = subprocess.Popen([*run, "send"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 30
        while len(srv.messages) < 22 and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        assert 0 < len(srv.messages) < len(emails)
        srv.faults.clear()

        again = subprocess.run([*run, "send"], env=env, capture_output=True, text=True, timeout=60)
        assert again.returncode == 0, again.stderr
        counts = collections.Counter(to for m in srv.messages for to in m["to"])
        assert sorted(counts) == emails and set(counts.values()) == {1}  # everyone exactly once
        store = open_store(db)
        statuses = {st for _id, _email, st in store.ledger_rows(1)}
        assert store.get_draft(1).status == "sent"
        store.close()
        assert statuses == {"sent"}  # nothing left uncertain: the resends settled it


def test_sigkill_of_a_send_with_helper_processes_then_restart_never_sends_twice(tmp_path: Path, db_url: str) -> None:
    """delivery.processes: 2. The parent (holding the lease) is killed mid-send; its helper
    finishes the batch in flight, sees its parent gone and stops; a restart completes the send
    and nobody gets two copies."""
    emails = [f"h{i:03d}@example.com" for i in range(80)]
    with FakeProviderServer(token=TOKEN) as srv:
        env, run, db = _prepare(tmp_path, srv, emails, "provider: postmark, concurrency: 1, processes: 2", db_url)
        srv.faults.extend([("delay", 0.25)] * 60)
        proc = subprocess.Popen([*run, "send"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        store = open_store(db)

        def holders() -> int:
            with store.engine.connect() as conn:
                return len(conn.exec_driver_sql(
                    "SELECT DISTINCT claim_token FROM send_batches WHERE claim_token IS NOT NULL").all())

        deadline = time.monotonic() + 60
        while (holders() < 2 or len(srv.messages) < 30) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert holders() == 2, "the helper process never claimed a batch"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        # The helper stops on its own after its batch in flight: nothing arrives after that.
        seen, still = len(srv.messages), time.monotonic()
        while time.monotonic() - still < 1.5 and time.monotonic() < deadline:
            time.sleep(0.1)
            if len(srv.messages) != seen:
                seen, still = len(srv.messages), time.monotonic()
        assert seen < len(emails)
        srv.faults.clear()

        again = subprocess.run([*run, "send"], env=env, capture_output=True, text=True, timeout=120)
        counts = collections.Counter(m["To"] for m in srv.messages)
        assert max(counts.values()) == 1, "someone got two copies"
        by_status = collections.defaultdict(set)
        for _id, email, st in store.ledger_rows(1):
            by_status[st].add(email)
        store.close()
        # Exit 3 when batches that were in flight wait for the operator as uncertain.
        assert again.returncode == (3 if by_status["uncertain"] else 0), again.stderr
        assert by_status.keys() <= {"sent", "uncertain"}
        assert by_status["sent"] | by_status["uncertain"] == set(emails)
        assert by_status["sent"] <= set(counts)


def test_ctrl_c_stops_after_the_batches_in_flight_with_a_summary(tmp_path: Path) -> None:
    """The first SIGINT stops claiming; the batches in flight are answered and settled, the
    summary is printed, the exit code says "resumable"; the next send delivers the rest, and
    nobody gets two copies or is left uncertain."""
    emails = [f"k{i:03d}@example.com" for i in range(200)]
    with FakeProviderServer(token=TOKEN) as srv:
        env, run, db = _prepare(tmp_path, srv, emails, "provider: postmark")
        srv.faults.extend([("delay", 0.25)] * 40)
        proc = subprocess.Popen([*run, "send"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 30
        while len(srv.messages) < 20 and time.monotonic() < deadline:
            time.sleep(0.02)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
        assert proc.returncode == 75, (out, err)
        assert "stopping after the batches in flight" in err
        assert "stopped on request" in out and "draft 1: sent " in out
        received = len(srv.messages)
        assert 20 <= received < len(emails)  # it stopped well before the end
        store = open_store(db)
        counts = store.ledger_counts(1)
        store.close()
        assert counts == {"sent": received, "pending": len(emails) - received}  # in flight: settled
        srv.faults.clear()

        again = subprocess.run([*run, "send"], env=env, capture_output=True, text=True, timeout=60)
        assert again.returncode == 0 and "finished" in again.stdout, again.stderr
        got = collections.Counter(m["To"] for m in srv.messages)
        assert sorted(got) == emails and set(got.values()) == {1}


def test_ctrl_c_on_the_terminal_reaches_helper_processes_without_cutting_their_batches(tmp_path: Path) -> None:
    """A terminal's Ctrl-C goes to the whole process group, helpers included: they finish their
    batch in flight and stop when the parent says so; nothing is left in flight or uncertain."""
    emails = [f"k{i:03d}@example.com" for i in range(200)]
    with FakeProviderServer(token=TOKEN) as srv:
        env, run, db = _prepare(tmp_path, srv, emails, "provider: postmark, processes: 2, concurrency: 1")
        srv.faults.extend([("delay", 0.3)] * 60)
        proc = subprocess.Popen([*run, "send"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
        deadline = time.monotonic() + 30
        while len(srv.messages) < 30 and time.monotonic() < deadline:
            time.sleep(0.02)
        os.killpg(proc.pid, signal.SIGINT)
        out, err = proc.communicate(timeout=30)
        assert proc.returncode == 75, (out, err)
        store = open_store(db)
        counts = store.ledger_counts(1)
        store.close()
        assert set(counts) == {"sent", "pending"} and counts["sent"] == len(srv.messages), counts
        srv.faults.clear()
        again = subprocess.run([*run, "send"], env=env, capture_output=True, text=True, timeout=60)
        assert again.returncode == 0, again.stdout + again.stderr
        got = collections.Counter(m["To"] for m in srv.messages)
        assert sorted(got) == emails and set(got.values()) == {1}


def test_ctrl_c_while_waiting_out_a_retry_after_stops_at_once(tmp_path: Path) -> None:
    """A 429 asking for a minute's wait does not hold up a Ctrl-C: the batch the provider
    refused goes back to the queue, and the next send delivers everyone once."""
    emails = [f"k{i:03d}@example.com" for i in range(10)]
    with FakeProviderServer(token=TOKEN) as srv:
        env, run, db = _prepare(tmp_path, srv, emails, "provider: postmark, concurrency: 1")
        (tmp_path / "config.yaml").write_text((tmp_path / "config.yaml").read_text().replace(
            "max_retries: 0", "max_retries: 3"))
        srv.faults.append(("status", 429, {"Retry-After": "60"}))
        proc = subprocess.Popen([*run, "send"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 30
        while not srv.requests and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.3)  # waiting out the Retry-After now
        asked = time.monotonic()
        proc.send_signal(signal.SIGINT)
        try:
            out, err = proc.communicate(timeout=30)
        finally:
            proc.kill()  # (a no-op once it has exited)
        assert time.monotonic() - asked < 5, "the send sat out the Retry-After"
        assert proc.returncode == 75 and "while waiting to retry" in out, (out, err)
        assert srv.messages == []
        store = open_store(db)
        assert store.ledger_counts(1) == {"pending": 10}
        store.close()
        again = subprocess.run([*run, "send"], env=env, capture_output=True, text=True, timeout=60)
        assert again.returncode == 0, again.stdout + again.stderr
        assert sorted(m["To"] for m in srv.messages) == emails


def test_sigkill_while_postmark_makes_its_template_leaves_nothing_uncertain(tmp_path: Path) -> None:
    """The draft's Postmark template is made before any batch is claimed: a kill -9 while
    that call is held holds no batch, so the restart finds nothing in flight, nothing
    uncertain, and sends everyone once."""
    emails = KILLED[:12]
    with FakeProviderServer(token=TOKEN) as srv:
        env, run, db = _prepare(tmp_path, srv, emails, "provider: postmark, postmark_templates: true, concurrency: 2")
        gate = threading.Event()
        srv.faults.append(("hold", gate))  # the first call: creating the template
        proc = subprocess.Popen([*run, "send"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            _wait_for(lambda: len(srv.held) == 1 or proc.poll() is not None, "the template's creation to be held")
            assert proc.poll() is None, proc.communicate()
            assert srv.held[0].path == "/templates"
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=10)
        finally:
            proc.kill()
            gate.set()
        store = open_store(db)
        assert {st for _id, _email, st in store.ledger_rows(1)} == {"pending"}  # nothing claimed
        store.close()
        srv.faults.clear()
        again = subprocess.run([*run, "send"], env=env, capture_output=True, text=True, timeout=60)
        assert again.returncode == 0, again.stdout + again.stderr
        assert "marked uncertain" not in again.stdout
        assert collections.Counter(parseaddr(m["To"])[1] for m in srv.messages) == collections.Counter(emails)
