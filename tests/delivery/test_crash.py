"""kill -9 in the middle of a send, then restart: nobody gets two copies (rule 1)."""

from __future__ import annotations

import collections
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from digest.store import open_store
from tests.fakes.provider_server import FakeProviderServer

TOKEN = "crash-token"


def _prepare(tmp_path: Path, srv: FakeProviderServer, emails: list[str], delivery: str) -> tuple[
        dict[str, str], list[str], Path]:
    """A config for the fake server (``delivery`` holds the provider's keys), the subscribers,
    a collected and approved draft; returns the environment, the command and the database."""
    from digest.sources.folder import SAMPLE_DIR

    db = tmp_path / "d.db"
    cfg = tmp_path / "config.yaml"
    cfg.write_text(f"""
database: {{url: "sqlite:///{db}"}}
newsletter: {{public_url: "https://news.example.org"}}
sources: [{{name: sample, type: folder, path: "{SAMPLE_DIR}"}}]
digest: {{approval: {{required: false}}}}
delivery: {{api_key: "{TOKEN}", base_url: "{srv.url}", batch_size: 5, max_retries: 0, {delivery}}}
""")
    (tmp_path / "subs.csv").write_text("".join(f"{e}\n" for e in emails))
    env = {**os.environ, "DIGEST_CONFIG": str(cfg)}
    run = [sys.executable, "-m", "digest"]
    for args in (["subscribers", "import", str(tmp_path / "subs.csv")], ["collect"], ["draft"]):
        subprocess.run([*run, *args], env=env, check=True, capture_output=True)
    return env, run, db


def test_sigkill_mid_send_then_restart_never_sends_twice(tmp_path: Path) -> None:
    emails = [f"k{i:03d}@example.com" for i in range(60)]
    with FakeProviderServer(token=TOKEN) as srv:
        env, run, db = _prepare(tmp_path, srv, emails, "provider: postmark")
        # Every call is accepted and recorded at once, but answered only after a pause:
        # the kill lands while a batch is in flight.
        srv.faults.extend([("delay", 0.25)] * 40)
        proc = subprocess.Popen([*run, "send"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 30
        while len(srv.messages) < 22 and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        assert proc.returncode == -signal.SIGKILL
        received_before = len(srv.messages)
        assert 0 < received_before < len(emails)
        srv.faults.clear()

        again = subprocess.run([*run, "send"], env=env, capture_output=True, text=True, timeout=60)
        # Finished, exit 3: the killed sender's batches in flight wait for the operator.
        assert again.returncode == 3, again.stderr
        assert "messages were in flight when a sender stopped; marked uncertain" in again.stdout
        status = subprocess.run([*run, "status"], env=env, capture_output=True, text=True, check=True).stdout

        counts = collections.Counter(m["To"] for m in srv.messages)
        assert max(counts.values()) == 1, "someone got two copies"
        store = open_store(f"sqlite:///{db}")
        rows = store.ledger_rows(1)
        store.close()
        by_status = collections.defaultdict(set)
        for _id, email, st in rows:
            by_status[st].add(email)
        received = {to for to in counts}
        # Everyone is either sent (exactly once) or uncertain (their batch was in flight).
        assert by_status.keys() <= {"sent", "uncertain"}
        assert by_status["sent"] | by_status["uncertain"] == set(emails)
        assert by_status["sent"] <= received
        assert 1 <= len(by_status["uncertain"]) <= 5 * 4  # at most the batches in flight (4 workers)
        assert "uncertain; resolve with" in status

        # The operator checks the provider's log and marks them sent: nothing more goes out.
        subprocess.run([*run, "send", "--resolve-uncertain", "mark-sent"], env=env, check=True, capture_output=True)
        assert len(srv.messages) == len(received)


def test_sigkill_mid_send_through_resend_resends_in_flight_batches_safely(tmp_path: Path) -> None:
    """With Resend's idempotency keys a restart settles in-flight batches by itself: the same
    batch, byte for byte, under the same key; the provider answers it without sending again."""
    emails = [f"k{i:03d}@example.com" for i in range(60)]
    with FakeProviderServer(token=TOKEN) as srv:
        from tests.fakes.provider_server import install_resend

        install_resend(srv)
        env, run, db = _prepare(tmp_path, srv, emails, "provider: resend")
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
        store = open_store(f"sqlite:///{db}")
        statuses = {st for _id, _email, st in store.ledger_rows(1)}
        assert store.get_draft(1).status == "sent"
        store.close()
        assert statuses == {"sent"}  # nothing left uncertain: the resends settled it


def test_sigkill_of_a_send_with_helper_processes_then_restart_never_sends_twice(tmp_path: Path) -> None:
    """delivery.processes: 2. The parent (holding the lease) is killed mid-send; its helper
    finishes the batch in flight, sees its parent gone and stops; a restart completes the send
    and nobody gets two copies."""
    emails = [f"h{i:03d}@example.com" for i in range(80)]
    with FakeProviderServer(token=TOKEN) as srv:
        env, run, db = _prepare(tmp_path, srv, emails, "provider: postmark, concurrency: 1, processes: 2")
        srv.faults.extend([("delay", 0.25)] * 60)
        proc = subprocess.Popen([*run, "send"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        store = open_store(f"sqlite:///{db}")

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
        store = open_store(f"sqlite:///{db}")
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
        store = open_store(f"sqlite:///{db}")
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
        store = open_store(f"sqlite:///{db}")
        assert store.ledger_counts(1) == {"pending": 10}
        store.close()
        again = subprocess.run([*run, "send"], env=env, capture_output=True, text=True, timeout=60)
        assert again.returncode == 0, again.stdout + again.stderr
        assert sorted(m["To"] for m in srv.messages) == emails
