"""Send throughput and memory: the whole sender against a local fake provider.

Usage::

    .venv/bin/python benchmarks/bench_send.py throughput [--provider postmark] [--recipients 20000]
    .venv/bin/python benchmarks/bench_send.py memory [--provider postmark] [--recipients 1000000]
    .venv/bin/python benchmarks/bench_send.py stages [--provider postmark-templates] [--recipients 200000]
    .venv/bin/python benchmarks/bench_send.py http [--provider sendgrid] [--runs 5]

``throughput`` sends a real draft (the bundled sample) to N subscribers through the real
Sender (SQLite ledger, claim, personalize, build, HTTP, settle) and, in the same run, posts the
very same request bodies, prebuilt, with a bare ``requests.Session``; it prints both rates and
their ratio (goal: the pipeline under 1.5x the bare cost), each the median of several runs.
It also reads, from the ledger, how long the sending itself took (first claim to last
settle, without opening the database, compiling, freezing the audience and starting helper
processes), where the machine's CPU went during the send (the sending processes, the fake
provider, the cores left idle), and times the provider layer alone: the prepared per-recipient values handed to the
provider, which builds each request, posts it and reads the answer (no ledger, no signing).

``ledger`` times the store's claim and settle per row (and freezing the audience first and
counting the statuses after), on a new SQLite file or on ``--database``; ``build`` times preparing one batch
(signing links, filling values) and building its request, without I/O.

``stages`` sends to N subscribers with one process and one worker and prints where that
worker's CPU time goes, per recipient: preparing the values (signing links), building the
request, the HTTP call, reading the answer, claiming and settling (each stage's thread CPU
time, read around the sender's own methods), next to the process's CPU time per recipient.

``http`` posts one prebuilt batch request (the provider's own, for 500 or 1,000 readers) again
and again, three ways in turn: ``Session.post`` on a session as it comes, ``Session.post`` on
one that read the environment once (``digest.http.read_environment_once``), and
``digest.http.ApiCalls`` on such a session (every provider's calls now), and prints the CPU
time of a call for each.

``memory`` fills a database with N subscribers, sends to all of them in a child process, and
prints the child's peak RSS next to its RSS after imports (goal: 64 MB with server-side
personalization, 128 MB with full bodies, for 1,000,000 subscribers).

``--provider postmark-templates`` is Postmark with ``delivery.postmark_templates``: a server
template per draft and ``/email/batchWithTemplates`` (the pipeline creates the template in the
fake and deletes it at the end).

The fake provider runs in its own process (so it does not compete for our interpreter lock),
answers at once, sets TCP_NODELAY and writes each response in one piece.

``throughput`` and ``stages`` print a yardstick first, the time of ``sum(range(1000))``: the
shared machines differ (and drift) by a factor of two, so compare figures taken with
different yardsticks by ratio, or run both sides in one session (ABBA).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

TOKEN = "bench-token"


def _certificate(folder: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and its key, as PEM files in ``folder``."""
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.now(UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - timedelta(hours=1))
            .not_valid_after(now + timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_file, key_file = folder / "cert.pem", folder / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_file, key_file


def _serve(conn: Any, provider: str, tls: bool) -> None:
    from tests.fakes import provider_server as fps

    srv = fps.FakeProviderServer(token=TOKEN, light=True)
    installer = getattr(fps, f"install_{provider}", None)
    if installer is not None and provider != "postmark":
        installer(srv)
    url, cert_file = srv.url, None
    if tls:  # HTTPS, as a provider's API is: the same fake behind TLS
        import ssl

        cert_file, key_file = _certificate(Path(tempfile.mkdtemp(prefix="digest-bench-tls-")))
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert_file, key_file)
        srv._server.socket = context.wrap_socket(srv._server.socket, server_side=True)
        url = url.replace("http://", "https://")
    srv.start()
    conn.send((url, str(cert_file) if cert_file else None))
    accepted = 0
    while conn.recv() == "clear":  # between runs: forget what was sent (Resend's keys too)
        accepted += len(srv.ledger_ids)
        srv.clear()
        own = resource.getrusage(resource.RUSAGE_SELF)
        conn.send(own.ru_utime + own.ru_stime)  # the fake's CPU seconds so far
    conn.send(accepted + len(srv.ledger_ids))
    srv.close()


class FakeProcess:
    """The fake provider in a child process."""

    def __init__(self, provider: str, tls: bool = False) -> None:
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_serve, args=(child, provider, tls), daemon=True)
        self.proc.start()
        self.url, cert_file = self.conn.recv()
        if cert_file:  # trusted by every session of this process and its children (requests reads it)
            os.environ["REQUESTS_CA_BUNDLE"] = cert_file

    def clear(self) -> float:
        """Forget what was sent; the fake's CPU seconds so far."""
        self.conn.send("clear")
        cpu: float = self.conn.recv()
        return cpu

    def stop(self) -> int:
        self.conn.send("stop")
        accepted: int = self.conn.recv()
        self.proc.join(10)
        return accepted


def make_settings(folder: Path, provider: str, url: str, concurrency: int | None, batch: int | None,
                  processes: int = 1, database: str | None = None) -> Any:
    from digest import config
    from digest.sources.folder import SAMPLE_DIR

    delivery: dict[str, Any] = {"provider": provider, "api_key": TOKEN, "base_url": url,
                                "rate_per_second": 1_000_000, "concurrency": concurrency,  # None: the default
                                "processes": processes}
    if batch:
        delivery["batch_size"] = batch
    if provider == "mailgun":
        delivery["domain"] = "mg.example.org"
    if provider == "postmark-templates":  # Postmark personalizing through a server template
        delivery.update(provider="postmark", postmark_templates=True)
    return config.from_dict({
        "database": {"url": database or f"sqlite:///{folder / 'bench.db'}"},
        "sources": [{"name": "sample", "type": "folder", "path": str(SAMPLE_DIR)}],
        "newsletter": {"public_url": "https://news.example.org", "from": "Field Notes <digest@example.org>"},
        "digest": {"approval": {"required": False}},
        "delivery": delivery,
    }, file="bench", path=str(folder / "config.yaml"))


def prepare(folder: Path, settings: Any, recipients: int) -> None:
    """A database with ``recipients`` active subscribers and one approved draft."""
    from sqlalchemy import insert

    from digest import pipeline
    from digest.store.schema import subscribers

    app = pipeline.App.open(settings)
    now = datetime.now(UTC)
    with app.store.engine.begin() as conn:
        for start in range(0, recipients, 50_000):
            conn.execute(insert(subscribers), [
                {"email": f"reader{i:07d}@example.com", "name": f"Reader {i}", "status": "active",
                 "origin": "bench", "created_at": now, "updated_at": now}
                for i in range(start, min(recipients, start + 50_000))])
    pipeline.collect(app)
    outcome = pipeline.make_draft(app)
    assert outcome.draft is not None and outcome.draft.status == "approved"
    app.secret  # noqa: B018  (created now, so every run signs the same links and sends the same bodies)
    app.close()


def machine_speed() -> str:
    """A yardstick for comparing figures taken on different machines, or on the same shared
    machine at different times: the best of five timings of ``sum(range(1000))``."""
    import timeit

    best = min(timeit.repeat("sum(range(1000))", number=2000, repeat=5)) / 2000
    return f"machine: sum(range(1000)) in {best * 1e6:.1f} µs"


def idle_seconds() -> float:
    """Seconds all of this machine's cores have been idle (``/proc/stat``), or NaN."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()
    except OSError:
        return float("nan")
    return (int(fields[4]) + int(fields[5])) / os.sysconf("SC_CLK_TCK")  # idle + iowait


def cpu_seconds() -> float:
    """CPU time of this process and of its children that have ended (a send's helper
    processes; not the fake provider, which runs until the benchmark ends)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


SEND_CPU: list[float] = []  # each send_once's CPU seconds (this process and its helpers)
IDLE: list[float] = []  # each send_once's idle core-seconds, machine-wide


def send_once(settings: Any) -> tuple[float, int]:
    from digest import pipeline

    app = pipeline.App.open(settings)
    cpu, idle = cpu_seconds(), idle_seconds()
    started = time.perf_counter()
    (summary,) = pipeline.send(app)
    elapsed = time.perf_counter() - started
    SEND_CPU.append(cpu_seconds() - cpu)
    IDLE.append(idle_seconds() - idle)
    app.close()
    return elapsed, summary.sent


def prepared_batches(settings: Any, recipients: int) -> tuple[Any, list[Any]]:
    """What the sender hands the provider for each batch (template + per-recipient values, or
    finished messages), built ahead of time (not timed)."""
    from digest import pipeline
    from digest.delivery.sender import Sender
    from digest.store.store import Claimed

    app = pipeline.App.open(settings)
    draft = app.store.get_draft(1)
    sender = Sender(app.store, app.provider, settings, draft, pipeline.compile_for(app, draft), app.link_pair,
                    now=app.now)
    batches = []
    for start in range(0, recipients, sender.batch_size):
        claimed = [Claimed(i + 1, i + 1, f"reader{i:07d}@example.com", f"Reader {i}")
                   for i in range(start, min(recipients, start + sender.batch_size))]
        batches.append(sender._prepare(claimed))
    return (app, sender), batches


def bare_bodies(settings: Any, recipients: int) -> list[tuple[str, dict[str, str], bytes]]:
    """The same requests the pipeline makes, built ahead of time (not timed)."""
    (app, sender), batches = prepared_batches(settings, recipients)
    out = []
    for prepared in batches:
        if sender.template is not None:
            call = app.provider.build_template_request(sender.template, prepared)  # type: ignore[attr-defined]
            if isinstance(call, tuple):  # SendGrid and Mailgun also return the ledger ids
                call = call[0]
        else:
            call = app.provider.build_request(prepared)  # type: ignore[attr-defined]
        out.append((call.url, dict(call.headers), call.body))
    app.close()
    return out


def handoff(settings: Any, recipients: int, concurrency: int) -> float:
    """The provider layer alone: prepared recipients in, provider calls out (build the request,
    POST, read the answer), ``concurrency`` batches at a time; no database, no signing."""
    import concurrent.futures

    (app, sender), batches = prepared_batches(settings, recipients)
    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(sender._call, batches))
    elapsed = time.perf_counter() - started
    assert sum(r.status == "sent" for batch in results for r in batch) == recipients
    app.close()
    return elapsed


def post_bare(calls: list[tuple[str, dict[str, str], bytes]], concurrency: int) -> float:
    import concurrent.futures

    import requests

    sessions = [requests.Session() for _ in range(concurrency)]

    def post(i: int) -> None:
        url, headers, body = calls[i]
        if "Idempotency-Key" in headers:
            # A fresh key per request and run: the pipeline's own keys are already spent on
            # other bodies (the fake, like Resend, refuses a key reused for a different body).
            headers = {**headers, "Idempotency-Key": uuid.uuid4().hex}
        r = sessions[i % concurrency].post(url, headers=headers, data=body, timeout=60)
        r.raise_for_status()

    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(post, range(len(calls))))
    return time.perf_counter() - started


def sending_phase(settings: Any) -> float:
    """Seconds from the send's first claim to its last settle, read from the ledger: the
    pipeline's time without opening the database, compiling the draft, freezing the audience
    and starting helper processes."""
    from sqlalchemy import create_engine, text

    engine = create_engine(settings.database.url)
    try:
        with engine.connect() as conn:
            first, last = conn.execute(text("SELECT min(claimed_at), max(settled_at) FROM send_batches")).one()
    finally:
        engine.dispose()
    if isinstance(first, str):  # SQLite keeps timestamps as text
        first, last = datetime.fromisoformat(first), datetime.fromisoformat(last)
    return float((last - first).total_seconds())


class Fresh:
    """The prepared database, restored before each run: a copy of the SQLite file, or on
    PostgreSQL a new database made from the prepared one as its template (``--database``
    names a database this benchmark may drop and create, with a ``_pristine`` twin)."""

    def __init__(self, base: Path, database: str | None) -> None:
        self.base, self.url = base, database
        if database:
            from sqlalchemy.engine import make_url

            url = make_url(database)
            self.name, self.pristine = url.database, f"{url.database}_pristine"
            self.admin = url.set(database="postgres")
            self._sql(f'DROP DATABASE IF EXISTS "{self.pristine}"', f'CREATE DATABASE "{self.pristine}"')
            self.prepare_url = url.set(database=self.pristine).render_as_string(hide_password=False)

    def _sql(self, *statements: str) -> None:
        from sqlalchemy import create_engine, text

        engine = create_engine(self.admin, isolation_level="AUTOCOMMIT")
        try:
            with engine.connect() as conn:
                for statement in statements:
                    conn.execute(text(statement))
        finally:
            engine.dispose()

    def prepared(self) -> None:
        """The database is filled: keep it as the pristine copy."""
        if not self.url:
            shutil.copy(self.base / "bench.db", self.base / "pristine.db")

    def restore(self) -> None:
        if self.url:
            self._sql(f'DROP DATABASE IF EXISTS "{self.name}"',
                      f'CREATE DATABASE "{self.name}" TEMPLATE "{self.pristine}"')
            return
        for suffix in ("-wal", "-shm"):
            (self.base / f"bench.db{suffix}").unlink(missing_ok=True)
        shutil.copy(self.base / "pristine.db", self.base / "bench.db")

    def drop(self) -> None:
        if self.url:
            self._sql(f'DROP DATABASE IF EXISTS "{self.name}"', f'DROP DATABASE IF EXISTS "{self.pristine}"')


def throughput(args: argparse.Namespace) -> None:
    fake = FakeProcess(args.provider, args.tls)
    base = Path(tempfile.mkdtemp(prefix="digest-bench-"))
    fresh = Fresh(base, args.database)
    try:
        settings = make_settings(base, args.provider, fake.url, args.concurrency, args.batch, args.processes,
                                 database=args.database)
        args.concurrency = settings.delivery.concurrency  # the provider's default when not given
        if args.database:
            prepare(base, make_settings(base, args.provider, fake.url, args.concurrency, args.batch,
                                        database=fresh.prepare_url), args.recipients)
        else:
            prepare(base, settings, args.recipients)
        fresh.prepared()
        pipe_times, bare_times, handoff_times, sending_times, fake_cpu = [], [], [], [], []
        fresh.restore()
        calls = bare_bodies(settings, args.recipients)
        payload = sum(len(b) for _, _, b in calls)
        for _ in range(args.runs):
            fresh.restore()
            before = fake.clear()
            elapsed, sent = send_once(settings)
            assert sent == args.recipients, sent
            fake_cpu.append(fake.clear() - before)
            pipe_times.append(elapsed)
            sending_times.append(sending_phase(settings))
            bare_times.append(post_bare(calls, args.concurrency))
            fake.clear()
            handoff_times.append(handoff(settings, args.recipients, args.concurrency))
        accepted = fake.stop()
    finally:
        fresh.drop()
        shutil.rmtree(base, ignore_errors=True)
    pipe, bare = statistics.median(pipe_times), statistics.median(bare_times)
    n = args.recipients
    print(f"provider {args.provider}, {n:,} recipients, batch {len(calls) and n // len(calls)}, "
          f"concurrency {args.concurrency}, processes {args.processes}, {len(calls)} requests, "
          f"{payload / 1e6:,.1f} MB of request bodies; {machine_speed()}")
    print(f"  pipeline (claim, personalize, build, POST, settle)  median {pipe:7.3f} s  {n / pipe:10,.0f} recipients/s")
    sending = statistics.median(sending_times)
    print(f"    of which sending (first claim to last settle)      median {sending:7.3f} s  "
          f"{n / sending:10,.0f} recipients/s")
    cpu = statistics.median(SEND_CPU)
    print(f"    CPU of the sending processes (parent and helpers)  median {cpu:7.3f} s  "
          f"{cpu / n * 1e6:7.2f} µs/recipient, {cpu / pipe:.2f} cores busy of {os.cpu_count()}")
    fcpu, idle = statistics.median(fake_cpu), statistics.median(IDLE)
    print(f"    CPU of the fake provider; all cores idle            median {fcpu:7.3f} s  "
          f"{fcpu / n * 1e6:7.2f} µs/recipient, {fcpu / pipe:.2f} cores; idle {idle / pipe:.2f} cores")
    print(f"  bare requests.Session, same prebuilt bodies          median {bare:7.3f} s  "
          f"{n / bare:10,.0f} recipients/s")
    hand = statistics.median(handoff_times)
    print(f"  provider layer alone (build, POST, read the answer)  median {hand:7.3f} s  "
              f"{n / hand:10,.0f} recipients/s")
    print(f"  pipeline / bare = {pipe / bare:.2f}x   (runs: {args.runs}; fake accepted {accepted:,})")


def peak_rss_kb() -> int:
    """This process's peak resident set (VmHWM). Unlike ``ru_maxrss``, it starts afresh at
    exec, so a child does not inherit the parent's peak from the moment it was forked."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _memory_child(settings: Any, conn: Any) -> None:
    import gc

    from digest import pipeline  # noqa: F401  (everything the send path imports)
    from digest.delivery import sender  # noqa: F401

    gc.collect()
    baseline = peak_rss_kb()
    elapsed, sent = send_once(settings)
    peak = peak_rss_kb()
    conn.send((baseline, peak, elapsed, sent))


def memory(args: argparse.Namespace) -> None:
    fake = FakeProcess(args.provider, args.tls)
    base = Path(tempfile.mkdtemp(prefix="digest-bench-"))
    try:
        settings = make_settings(base, args.provider, fake.url, args.concurrency, args.batch)
        args.concurrency = settings.delivery.concurrency
        t0 = time.perf_counter()
        prepare(base, settings, args.recipients)
        setup = time.perf_counter() - t0
        ctx = mp.get_context("spawn")
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_memory_child, args=(settings, child))
        proc.start()
        baseline, peak, elapsed, sent = parent.recv()
        proc.join()
        accepted = fake.stop()
    finally:
        shutil.rmtree(base, ignore_errors=True)
    print(f"provider {args.provider}, {args.recipients:,} subscribers (setup {setup:.0f} s), "
          f"concurrency {args.concurrency}")
    print(f"  sent {sent:,} in {elapsed:.1f} s ({sent / elapsed:,.0f}/s); fake accepted {accepted:,}")
    print(f"  RSS after imports {baseline / 1024:.1f} MB; peak RSS {peak / 1024:.1f} MB; "
          f"growth during the send {(peak - baseline) / 1024:.1f} MB")


def ledger(args: argparse.Namespace) -> None:
    """Claim and settle every row of a draft of N subscribers, timing the two store calls."""
    from digest import pipeline
    from digest.types import SendResult

    base = Path(tempfile.mkdtemp(prefix="digest-bench-"))
    try:
        settings = make_settings(base, args.provider, "http://127.0.0.1:9", 1, args.batch, database=args.database)
        prepare(base, settings, args.recipients)
        app = pipeline.App.open(settings)
        store, now = app.store, datetime.now(UTC)
        t0 = time.perf_counter()
        store.start_send(1, now)
        freeze = time.perf_counter() - t0
        claim = settle = 0.0
        rows = 0
        while True:
            t0 = time.perf_counter()
            claimed = store.claim_batch(1, args.batch or 1000, "bench", now)
            t1 = time.perf_counter()
            if not claimed:
                break
            # Distinct message ids, as Postmark gives: the per-row settle, the costlier one.
            results = [SendResult(c.ledger_id, "sent", f"msg-{c.ledger_id}") for c in claimed]
            t2 = time.perf_counter()
            store.settle(results, args.provider, now, claimed)
            claim += t1 - t0
            settle += time.perf_counter() - t2
            rows += len(claimed)
        t0 = time.perf_counter()
        counts = store.ledger_counts(1)
        counting = time.perf_counter() - t0
        assert counts == {"sent": rows}, counts
        app.close()
    finally:
        shutil.rmtree(base, ignore_errors=True)
    print(f"{rows:,} ledger rows in batches of {args.batch or 1000}: freeze {freeze / rows * 1e6:.2f} µs/row, "
          f"claim {claim / rows * 1e6:.2f} µs/row, settle {settle / rows * 1e6:.2f} µs/row, "
          f"counting them {counting * 1000:.0f} ms")


def build(args: argparse.Namespace) -> None:
    """Prepare one batch (sign links, fill values) and build its request, best of 5 x 5."""
    import timeit

    base = Path(tempfile.mkdtemp(prefix="digest-bench-"))
    try:
        settings = make_settings(base, args.provider, "http://127.0.0.1:9", 1, args.batch)
        prepare(base, settings, 10)
        (app, sender), (batch,) = prepared_batches(settings, sender_batch(settings))
        from digest.store.store import Claimed

        claimed = [Claimed(i + 1, i + 1, f"reader{i:07d}@example.com", f"Reader {i}") for i in range(len(batch))]
        if sender.template is not None:
            def make() -> Any:
                return app.provider.build_template_request(sender.template, batch)  # type: ignore[attr-defined]
        else:
            def make() -> Any:
                return app.provider.build_request(batch)  # type: ignore[attr-defined]
        n = len(batch)
        prep = min(timeit.repeat(lambda: sender._prepare(claimed), number=5, repeat=5)) / 5
        made = min(timeit.repeat(make, number=5, repeat=5)) / 5
        app.close()
    finally:
        shutil.rmtree(base, ignore_errors=True)
    print(f"{args.provider}, batch of {n}: prepare {prep / n * 1e6:.2f} µs/recipient, "
          f"build the request {made / n * 1e6:.2f} µs/recipient")


def stages(args: argparse.Namespace) -> None:
    """One process, one worker: each stage's thread CPU time per recipient (see the docstring)."""
    import functools
    from collections import Counter

    from digest.delivery.providers.base import HttpProvider
    from digest.delivery.sender import Sender
    from digest.store.store import Store

    spent: Counter[str] = Counter()

    def timed(owner: Any, name: str, stage: str) -> None:
        original = getattr(owner, name)

        @functools.wraps(original)
        def wrapper(*a: Any, **k: Any) -> Any:
            started = time.thread_time()
            try:
                return original(*a, **k)
            finally:
                spent[stage] += time.thread_time() - started

        setattr(owner, name, wrapper)

    from digest.delivery.providers import mailgun, postmark, resend, sendgrid, ses

    # Stages in the order a batch meets them. Each provider reads its answer after perform()
    # returns: Postmark in _results (for both endpoints), the others in parse_response.
    for owner, name, stage in ((Store, "claim_batch", "claim"), (Sender, "_prepare", "prepare"),
                               (Sender, "_ready", "build"), (HttpProvider, "perform", "HTTP call"),
                               (postmark.PostmarkProvider, "_results", "answer"),
                               (sendgrid.SendGridProvider, "parse_response", "answer"),
                               (mailgun.MailgunProvider, "parse_response", "answer"),
                               (resend.ResendProvider, "parse_response", "answer"),
                               (ses.SesProvider, "parse_response", "answer"),
                               (Sender, "_settle", "settle"), (Sender, "_worker", "worker, in all")):
        timed(owner, name, stage)
    fake = FakeProcess(args.provider, args.tls)
    base = Path(tempfile.mkdtemp(prefix="digest-bench-"))
    try:
        settings = make_settings(base, args.provider, fake.url, 1, args.batch, 1)
        prepare(base, settings, args.recipients)
        before = resource.getrusage(resource.RUSAGE_SELF)
        elapsed, sent = send_once(settings)
        after = resource.getrusage(resource.RUSAGE_SELF)
        assert sent == args.recipients, sent
        fake.stop()
    finally:
        shutil.rmtree(base, ignore_errors=True)
    n = args.recipients
    process = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    print(machine_speed())
    print(f"provider {args.provider}, {n:,} recipients, one process, one worker: {n / elapsed:,.0f} recipients/s; "
          f"process CPU {process / n * 1e6:.2f} µs/recipient")
    for stage in ("claim", "prepare", "build", "HTTP call", "answer", "settle", "worker, in all"):
        print(f"  {stage:15s} {spent[stage] / n * 1e6:6.2f} µs/recipient")


def http_calls(args: argparse.Namespace) -> None:
    """The CPU time of one provider call through requests: the environment read on every
    request, or once (see the docstring)."""
    import requests

    from digest.http import ApiCalls, read_environment_once

    fake = FakeProcess(args.provider, args.tls)
    base = Path(tempfile.mkdtemp(prefix="digest-bench-"))
    try:
        settings = make_settings(base, args.provider, fake.url, 1, args.batch)
        prepare(base, settings, 10)
        url, headers, body = bare_bodies(settings, sender_batch(settings))[0]
        plain, once, direct = requests.Session(), requests.Session(), requests.Session()
        read_environment_once(once, url)
        read_environment_once(direct, url)
        calls = ApiCalls(direct)

        def post(session: Any) -> Any:
            return session.post(url, headers=headers, data=body, timeout=60, allow_redirects=False)

        ways: dict[str, Callable[[], Any]] = {
            "Session.post, environment read per request": lambda: post(plain),
            "Session.post, environment read once": lambda: post(once),
            "ApiCalls (the providers' own calls)": lambda: calls("POST", url, headers, body, 60),
        }
        times: dict[str, list[float]] = {label: [] for label in ways}
        for _ in range(args.runs):
            for label, call in ways.items():
                started = time.process_time()
                for _ in range(100):
                    response = call()
                    response.content  # noqa: B018 (read the answer, as a provider does)
                    assert response.status_code < 300, response.status_code
                times[label].append((time.process_time() - started) / 100)
        fake.stop()
    finally:
        shutil.rmtree(base, ignore_errors=True)
    print(f"provider {args.provider}, one request of {len(body):,} bytes, 100 calls x {args.runs} runs")
    for label, seconds in times.items():
        print(f"  {label:44s} median {statistics.median(seconds) * 1e3:6.3f} ms CPU a call")


def sender_batch(settings: Any) -> int:
    from digest import pipeline

    app = pipeline.App.open(settings)
    size = min(settings.delivery.batch_size or app.provider.max_batch, app.provider.max_batch)
    app.close()
    return size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", choices=["throughput", "memory", "ledger", "build", "stages", "http"])
    parser.add_argument("--provider", default="postmark",
                        help="a delivery.provider, or postmark-templates: postmark with postmark_templates")
    parser.add_argument("--recipients", type=int, default=None)
    parser.add_argument("--concurrency", type=int, default=None,
                        help="delivery.concurrency; default: the provider's (2 for SendGrid and Mailgun, 4 otherwise)")
    parser.add_argument("--processes", type=int, default=1,
                        help="delivery.processes for the pipeline (throughput); the other runs use one")
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--tls", action="store_true",
                        help="the fake provider over HTTPS (a self-signed certificate the runs trust)")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--database", default=None,
                        help="ledger: an empty database to run on (e.g. postgresql+psycopg://...); "
                             "throughput: a PostgreSQL database to drop and create for each run, made from "
                             "a '<name>_pristine' twin it fills first; default a new SQLite file")
    args = parser.parse_args()
    if args.recipients is None:
        args.recipients = 1_000_000 if args.mode == "memory" else 20_000
    os.environ.setdefault("PYTHONHASHSEED", "0")
    {"throughput": throughput, "memory": memory, "ledger": ledger, "build": build, "stages": stages,
     "http": http_calls}[args.mode](args)


if __name__ == "__main__":
    main()
