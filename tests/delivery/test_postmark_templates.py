"""Postmark through a server template (``delivery.postmark_templates``): the opt-in, the
template (and how static text stays literal under Mustachio), its lifecycle (created once and
reused, deleted when the draft is sent, never by a dry run), the batch and its errors.

The fake Postmark (tests/fakes/provider_server.py) renders each message from the stored
template and its model with Mustachio's tag pattern: ``{{{x}}}`` raw, ``{{x}}`` HTML-escaped,
comments dropped; sections and partials, which our templates never use, are refused.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterator, Sequence
from dataclasses import replace
from html import escape
from pathlib import Path

import pytest
import responses
from hypothesis import given, settings
from hypothesis import strategies as st

from digest import pipeline
from digest.config import Delivery
from digest.delivery.mime import clean_header_value
from digest.delivery.providers import postmark_templates
from digest.delivery.providers.base import expand_template
from digest.delivery.providers.postmark import PostmarkProvider
from digest.delivery.providers.postmark_templates import (
    PostmarkTemplateProvider,
    mustachio,
    neutralize,
    server_template,
)
from digest.delivery.providers.registry import build_provider
from digest.errors import AuthError, BlockedError, ConfigError, DeliveryError
from digest.types import TemplateMessage, TemplateRecipient
from tests.conftest import FrozenClock, make_settings
from tests.delivery.test_provider_contract import make_recipient, make_template
from tests.fakes.provider_server import (
    POSTMARK_ALIAS_TAKEN,
    FakeProviderServer,
    Reply,
    Request,
    mustachio_parse,
    mustachio_render,
)

TOKEN = "pm-template-token"

# Mustachio's syntax, as a comment might quote it: each must reach the reader as written.
QUOTED = ["{{name}}", "{{{name}}}", "{{ h0 }}", "{{{h0}}}", "{{{t1}}}", "{{#each items}}", "{{/each}}",
          "{{#o}}x{{/o}}", "{{^o}}", "{{!comment}}", "{{> partial}}", "{{&o}}", "{{o}}", "{{{o}}}",
          "}}", "{{", "{{{", "{{{{", "{{{{{", "{", "}}}", "{ {", "{{}}", "{{{}}}", "a{{b}}}c"]


def _settings(srv: FakeProviderServer, **extra: object) -> Delivery:
    return Delivery(provider="postmark", api_key=TOKEN, base_url=srv.url, timeout=5,
                    postmark_templates=True, **extra)  # type: ignore[arg-type]


@pytest.fixture
def srv() -> Iterator[FakeProviderServer]:
    with FakeProviderServer(token=TOKEN) as server:
        yield server


@pytest.fixture
def provider(srv: FakeProviderServer) -> Iterator[PostmarkTemplateProvider]:
    built = build_provider(_settings(srv))
    assert isinstance(built, PostmarkTemplateProvider)
    with built:
        yield built


def _posts(srv: FakeProviderServer, path: str) -> int:
    return len([r for r in srv.requests if r.method == "POST" and r.path == path])


# -- the opt-in -------------------------------------------------------------------------------


def test_off_by_default_full_bodies_as_before(srv: FakeProviderServer) -> None:
    settings = Delivery(provider="postmark", api_key=TOKEN, base_url=srv.url)
    assert settings.postmark_templates is False
    provider = build_provider(settings)
    assert type(provider) is PostmarkProvider and not provider.personalizes
    assert settings.concurrency == 4  # the full-body default, unchanged


def test_opt_in_builds_the_template_provider_only_with_server_side_personalization(
        srv: FakeProviderServer) -> None:
    on = _settings(srv)
    assert type(build_provider(on)) is PostmarkTemplateProvider
    assert build_provider(on).personalizes
    assert on.concurrency == 2  # the server-side default, as for SendGrid and Mailgun
    off = _settings(srv, server_side_personalization=False)
    assert type(build_provider(off)) is PostmarkProvider


def test_the_setting_is_for_postmark_only(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="postmark_templates is for provider postmark"):
        make_settings(tmp_path, delivery={"provider": "sendgrid", "api_key": "k", "postmark_templates": True})
    settings = make_settings(tmp_path, delivery={"provider": "postmark", "api_key": "k",
                                                 "postmark_templates": "true"})
    assert settings.delivery.postmark_templates is True


# -- the template: static text stays literal ----------------------------------------------------


def _rendered(template: TemplateMessage, recipient: TemplateRecipient) -> tuple[str, str, str]:
    """What Postmark makes of the server template for ``recipient``'s model."""
    made = server_template(template)
    problems = [mustachio_parse(made.body[f]) for f in ("Subject", "HtmlBody", "TextBody")]
    assert not any(isinstance(p, str) for p in problems), problems
    model = {"o": "{{"}
    for name, is_html, index in made.keys:
        model[name] = (recipient.html_values if is_html else recipient.text_values)[index]
    return (mustachio_render(made.body["Subject"], model, html=False),
            mustachio_render(made.body["HtmlBody"], model, html=True),
            mustachio_render(made.body["TextBody"], model, html=False))


@pytest.mark.parametrize("quoted", QUOTED)
def test_quoted_syntax_renders_as_written(quoted: str) -> None:
    template = make_template(comment=f"see {quoted} here", subject=f"Digest {quoted}")
    recipient = make_recipient(5, name="Ann {{o}} <b>")
    expected = expand_template(template, recipient)
    assert _rendered(template, recipient) == (expected.subject, expected.html, expected.text)


def test_neutralized_text_holds_no_tag_but_ours() -> None:
    text = "".join(QUOTED)
    pieces = mustachio_parse(neutralize(text))
    assert not isinstance(pieces, str)
    assert {p for kind, p in pieces if kind != "content"} == {"o"}
    assert all(kind in ("content", "raw") for kind, _p in pieces)
    # A lone "{" right before a slot, or right after one, stays content.
    assert mustachio(["x{", "}y"], ["name"], "h") == "x{{{{h0}}}}y"
    assert mustachio_parse("x{{{{h0}}}}y") == [("content", "x{"), ("raw", "h0"), ("content", "}y")]


@settings(max_examples=300, deadline=None)
@given(comment=st.text(alphabet="{}#/!>^& ho0x", max_size=30), subject=st.text(alphabet="{}# o", max_size=12))
def test_any_braces_in_content_render_as_written(comment: str, subject: str) -> None:
    template = make_template(comment=comment, subject=f"S{subject}")
    recipient = make_recipient(6)
    expected = expand_template(template, recipient)
    # The subject as every Postmark path sends it: a header value, cleaned.
    subject_sent = clean_header_value(expected.subject)
    assert _rendered(template, recipient) == (subject_sent, expected.html, expected.text)


@settings(max_examples=300, deadline=None)
@given(parts=st.lists(st.text(alphabet="{}#/!>^&o h0", max_size=8), min_size=3, max_size=3))
def test_braces_right_beside_the_slots_render_as_written(parts: list[str]) -> None:
    # Static text touching a slot on either side: "{" before "{{{h0}}}", "}" after it.
    template = TemplateMessage(draft_id=3, from_addr="Field Notes <digest@news.example.org>", subject="S",
                               html_parts=tuple(parts), html_slots=("name", "unsubscribe_url"),
                               text_parts=tuple(reversed(parts)), text_slots=("unsubscribe_url", "name"))
    recipient = make_recipient(7, name="{{{o}}} & }}")
    expected = expand_template(template, recipient)
    assert _rendered(template, recipient)[1:] == (expected.html, expected.text)


def test_alias_names_the_draft_and_the_content() -> None:
    first = server_template(make_template())
    assert first.alias.startswith("digest-7-") and len(first.alias) == len("digest-7-") + 12
    assert first.body["TemplateType"] == "Standard"
    assert server_template(make_template()).alias == first.alias
    assert server_template(make_template(comment="changed")).alias != first.alias
    assert server_template(make_template(draft_id=8)).alias.startswith("digest-8-")


# -- the batch ------------------------------------------------------------------------------------


def test_batch_is_one_call_with_a_model_per_reader(provider: PostmarkTemplateProvider,
                                                   srv: FakeProviderServer) -> None:
    template = make_template(comment="Quoting {{name}} and }} literally")
    recipients = [make_recipient(41), make_recipient(42, email="broken"), make_recipient(43, name="Bo <b>")]
    results = provider.send_template_batch(template, recipients)
    assert [(r.ledger_id, r.status) for r in results] == [(41, "sent"), (42, "invalid"), (43, "sent")]
    assert all(r.provider_message_id for r in results if r.status == "sent")
    assert [(r.method, r.path) for r in srv.requests] == [("POST", "/templates"),
                                                          ("POST", "/email/batchWithTemplates")]
    alias = server_template(template).alias
    created = srv.requests[0].json()
    assert created["Alias"] == alias and created["TemplateType"] == "Standard"
    body = srv.requests[1].json()
    assert list(body) == ["Messages"] and len(body["Messages"]) == 2
    first = body["Messages"][0]
    assert first["TemplateAlias"] == alias and first["InlineCss"] is False
    assert first["TemplateModel"] == {"o": "{{", "h0": "Reader 41", "h1": "https://news.example.org/u/tok0041",
                                      "t0": "Reader 41", "t1": "https://news.example.org/u/tok0041"}
    assert first["Metadata"] == {"ledger_id": "41", "draft_id": "7"}
    assert first["MessageStream"] == "broadcast" and first["Tag"] == "digest-7"
    assert {h["Name"]: h["Value"] for h in first["Headers"]} == dict(recipients[0].headers)
    assert body["Messages"][1]["TemplateModel"]["h0"] == escape("Bo <b>")
    for got, recipient in zip(srv.messages, (recipients[0], recipients[2])):
        expected = expand_template(template, recipient)
        assert (got["Subject"], got["html"], got["text"]) == (expected.subject, expected.html, expected.text)


def test_a_batch_of_500_is_one_call_and_501_is_refused(provider: PostmarkTemplateProvider,
                                                       srv: FakeProviderServer) -> None:
    assert PostmarkTemplateProvider.max_batch == 500
    results = provider.send_template_batch(make_template(), [make_recipient(i) for i in range(1, 501)])
    assert [r.status for r in results] == ["sent"] * 500
    assert _posts(srv, "/email/batchWithTemplates") == 1
    with pytest.raises(ValueError, match="the limit is"):
        provider.send_template_batch(make_template(), [make_recipient(i) for i in range(1, 502)])


def test_build_is_pure_and_matches_the_send(provider: PostmarkTemplateProvider, srv: FakeProviderServer) -> None:
    template, recipients = make_template(), [make_recipient(1), make_recipient(2)]
    call = provider.build_template_request(template, recipients)
    assert srv.requests == [] and srv.templates == {}  # a dry run creates nothing
    provider.send_template_batch(template, recipients)
    assert srv.requests[-1].body == call.body


def test_a_plain_link_is_one_model_value_for_both_parts(provider: PostmarkTemplateProvider,
                                                       srv: FakeProviderServer) -> None:
    template = replace(make_template(), plain_slots=frozenset({"unsubscribe_url"}))
    recipients = [make_recipient(1), make_recipient(2, name="Bo & <Jo>")]
    results = provider.send_template_batch(template, recipients)
    assert [r.status for r in results] == ["sent", "sent"]
    assert "{{{h1}}}" in srv.requests[0].json()["TextBody"]  # the text part reads the HTML value
    models = [m["TemplateModel"] for m in srv.requests[1].json()["Messages"]]
    # No "{{" in this content, so no "o"; the name differs escaped, the link does not.
    assert models[0] == {"h0": "Reader 1", "h1": "https://news.example.org/u/tok0001", "t0": "Reader 1"}
    assert models[1]["h0"] == escape("Bo & <Jo>") and models[1]["t0"] == "Bo & <Jo>"
    for got, recipient in zip(srv.messages, recipients):
        expected = expand_template(template, recipient)
        assert (got["Subject"], got["html"], got["text"]) == (expected.subject, expected.html, expected.text)


def test_the_model_carries_o_only_for_content_that_holds_braces(provider: PostmarkTemplateProvider,
                                                               srv: FakeProviderServer) -> None:
    for comment, subject, carries in (("No braces here.", "Plain", False), ("A {{x}} quoted", "Plain", True),
                                      ("No braces here.", "About {{y}}", True)):
        srv.clear()
        template, recipient = make_template(comment=comment, subject=subject), make_recipient(5)
        assert server_template(template).opens is carries
        provider.send_template_batch(template, [recipient])
        (message,) = [r for r in srv.requests if r.path == "/email/batchWithTemplates"][0].json()["Messages"]
        assert ("o" in message["TemplateModel"]) is carries
        expected = expand_template(template, recipient)
        assert (srv.messages[0]["Subject"], srv.messages[0]["text"]) == (expected.subject, expected.text)


def test_a_reader_whose_plain_link_differs_is_refused_not_sent_wrong(provider: PostmarkTemplateProvider,
                                                                     srv: FakeProviderServer) -> None:
    template = replace(make_template(), plain_slots=frozenset({"unsubscribe_url"}))
    odd = make_recipient(2)
    odd = odd._replace(html_values=(odd.html_values[0], odd.html_values[1] + "&amp;x=1", odd.html_values[2]),
                       text_values=(odd.text_values[0], odd.text_values[1] + "&x=1", odd.text_values[2]))
    results = provider.send_template_batch(template, [make_recipient(1), odd])
    assert [(r.ledger_id, r.status) for r in results] == [(1, "sent"), (2, "invalid")]
    assert "differs" in (results[1].error or "")
    assert [m["To"] for m in srv.messages] == ["Reader 1 <reader1@example.com>"]


@pytest.mark.parametrize(("status", "retryable"), [(429, True), (500, True), (503, True)])
def test_rate_limit_and_server_errors_are_retryable(provider: PostmarkTemplateProvider, srv: FakeProviderServer,
                                                    status: int, retryable: bool) -> None:
    provider.ensure_template(make_template())
    srv.faults.append(("status", status, {"Retry-After": "7"}, {"ErrorCode": 429, "Message": "slow"}))
    with pytest.raises(DeliveryError) as info:
        provider.send_template_batch(make_template(), [make_recipient(1)])
    assert info.value.retryable is retryable and not isinstance(info.value, AuthError)
    assert info.value.retry_after == 7
    assert srv.messages == []


def test_401_on_the_batch_is_an_auth_error(provider: PostmarkTemplateProvider, srv: FakeProviderServer) -> None:
    provider.ensure_template(make_template())
    srv.faults.append(("status", 401, {}, {"ErrorCode": 10, "Message": "Bad token"}))
    with pytest.raises(AuthError):
        provider.send_template_batch(make_template(), [make_recipient(1)])


def test_permanent_error_is_not_retryable(provider: PostmarkTemplateProvider, srv: FakeProviderServer) -> None:
    provider.ensure_template(make_template())
    srv.faults.append(("status", 422, {}, {"ErrorCode": 300, "Message": "Invalid email request"}))
    with pytest.raises(DeliveryError) as info:
        provider.send_template_batch(make_template(), [make_recipient(1)])
    assert not info.value.retryable and info.value.status == 422 and not isinstance(info.value, AuthError)


def test_per_message_refusals_map_to_the_ledger(provider: PostmarkTemplateProvider, srv: FakeProviderServer) -> None:
    srv.inactive.add("gone@example.com")
    results = provider.send_template_batch(make_template(), [make_recipient(1),
                                                             make_recipient(2, email="gone@example.com")])
    assert [r.status for r in results] == ["sent", "suppressed"]


SIGNATURE = "The 'From' address you supplied is not a Sender Signature on your account."


def test_a_sender_signature_refusal_of_every_message_stops_the_send(provider: PostmarkTemplateProvider,
                                                                    srv: FakeProviderServer) -> None:
    """ErrorCode 400 in each item of /email/batchWithTemplates: no reader's rejection; the send
    stops with the batch back in the queue, and the batch sent again once fixed is delivered."""
    template = make_template()
    provider.ensure_template(template)  # the fault is for the batch, not the create
    srv.faults.append(("partial", {0: (400, SIGNATURE), 1: (400, SIGNATURE)}))
    with pytest.raises(BlockedError) as info:
        provider.send_template_batch(template, [make_recipient(1), make_recipient(2)])
    assert "ErrorCode 400" in str(info.value) and "sender signature" in (info.value.hint or "")
    assert srv.ledger_ids == []
    results = provider.send_template_batch(template, [make_recipient(1), make_recipient(2)])
    assert [r.status for r in results] == ["sent", "sent"] and sorted(srv.ledger_ids) == [1, 2]


def test_a_sender_refusal_beside_accepted_messages_keeps_them_sent(provider: PostmarkTemplateProvider,
                                                                   srv: FakeProviderServer) -> None:
    provider.ensure_template(make_template())
    srv.faults.append(("partial", {1: (401, "Sender signature not confirmed.")}))
    results = provider.send_template_batch(make_template(), [make_recipient(1), make_recipient(2)])
    assert [(r.ledger_id, r.status) for r in results] == [(1, "sent"), (2, "deferred")]
    assert (results[1].error or "").startswith("not sent: Postmark ErrorCode 401") and srv.ledger_ids == [1]


# -- the template's lifecycle -------------------------------------------------------------------


def test_template_is_created_once_and_reused(provider: PostmarkTemplateProvider, srv: FakeProviderServer) -> None:
    template = make_template()
    for i in range(3):
        provider.send_template_batch(template, [make_recipient(i + 1)])
    assert _posts(srv, "/templates") == 1 and _posts(srv, "/email/batchWithTemplates") == 3
    assert list(srv.templates) == [server_template(template).alias]


def test_an_existing_template_is_used(srv: FakeProviderServer) -> None:
    # A resumed send, or another process of delivery.processes, finds it there already.
    template = make_template()
    with build_provider(_settings(srv)) as first:
        first.send_template_batch(template, [make_recipient(1)])
    with build_provider(_settings(srv)) as second:
        results = second.send_template_batch(template, [make_recipient(2)])
    assert [r.status for r in results] == ["sent"]
    assert [(r.method, r.path) for r in srv.requests][2:] == [
        ("POST", "/templates"), ("GET", f"/templates/{server_template(template).alias}"),
        ("POST", "/email/batchWithTemplates")]
    assert len(srv.templates) == 1


def test_two_processes_creating_at_once_both_send(srv: FakeProviderServer) -> None:
    template = make_template()
    providers = [build_provider(_settings(srv)) for _ in range(4)]
    barrier = threading.Barrier(len(providers))
    outcomes: list[object] = []

    def send(p: object, i: int) -> None:
        barrier.wait()
        try:
            outcomes.append(p.send_template_batch(template, [make_recipient(i)]))  # type: ignore[attr-defined]
        except Exception as exc:  # noqa: BLE001 (reported below)
            outcomes.append(exc)

    threads = [threading.Thread(target=send, args=(p, i + 1)) for i, p in enumerate(providers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(isinstance(o, list) and o[0].status == "sent" for o in outcomes), outcomes
    assert len(srv.templates) == 1 and sorted(srv.ledger_ids) == [1, 2, 3, 4]


def test_a_create_whose_answer_was_lost_is_found_on_retry(srv: FakeProviderServer) -> None:
    # The create went through but its answer timed out: a plain retryable error (nothing was
    # sent to anyone); the retry finds the template and sends.
    provider = build_provider(_settings(srv).model_copy(update={"timeout": 0.3}))
    srv.faults.append(("delay", 1.0))
    with pytest.raises(DeliveryError) as info:
        provider.send_template_batch(make_template(), [make_recipient(1)])
    assert info.value.retryable and not getattr(info.value, "maybe_delivered", False)
    assert _posts(srv, "/email/batchWithTemplates") == 0 and len(srv.templates) == 1
    results = provider.send_template_batch(make_template(), [make_recipient(1)])
    assert [r.status for r in results] == ["sent"] and len(srv.templates) == 1


def test_a_refused_token_on_create_names_the_setting(srv: FakeProviderServer) -> None:
    provider = build_provider(_settings(srv).model_copy(update={"api_key": "wrong"}))
    with pytest.raises(AuthError) as info:
        provider.send_template_batch(make_template(), [make_recipient(1)])
    assert "creating template digest-7-" in str(info.value) and "\n" not in str(info.value)
    assert info.value.hint and "delivery.api_key" in info.value.hint
    assert srv.templates == {} and _posts(srv, "/email/batchWithTemplates") == 0


def test_a_refused_create_is_one_clear_line(provider: PostmarkTemplateProvider, srv: FakeProviderServer) -> None:
    limit = {"ErrorCode": 1105, "Message": "This server has reached its template limit."}
    srv.faults.append(("status", 422, {}, limit))
    with pytest.raises(BlockedError) as info:
        provider.send_template_batch(make_template(), [make_recipient(1)])
    assert str(info.value).startswith("postmark: creating template digest-7-")
    assert "ErrorCode 1105: This server has reached its template limit." in str(info.value)
    assert info.value.hint and "delivery.postmark_templates" in info.value.hint
    assert _posts(srv, "/email/batchWithTemplates") == 0


def test_a_template_deleted_meanwhile_stops_the_send_and_is_made_again(provider: PostmarkTemplateProvider,
                                                                      srv: FakeProviderServer) -> None:
    template = make_template()
    provider.send_template_batch(template, [make_recipient(1)])
    srv.templates.clear()  # deleted in Postmark's web app, say
    with pytest.raises(BlockedError, match="every message of the batch was refused"):
        provider.send_template_batch(template, [make_recipient(2), make_recipient(3)])
    results = provider.send_template_batch(template, [make_recipient(2), make_recipient(3)])
    assert [r.status for r in results] == ["sent", "sent"] and len(srv.templates) == 1


def test_template_done_deletes_it_and_a_missing_one_is_fine(provider: PostmarkTemplateProvider,
                                                             srv: FakeProviderServer) -> None:
    template = make_template()
    provider.send_template_batch(template, [make_recipient(1)])
    provider.template_done(template)
    assert srv.templates == {}
    provider.template_done(template)  # gone already (another process): no error
    provider.send_template_batch(template, [make_recipient(2)])  # a later resend makes it again
    assert len(srv.templates) == 1


def test_the_fake_accepts_the_alias_taken_code_we_do_not_depend_on(srv: FakeProviderServer) -> None:
    # The provider reads the alias after any refused create; the fake's code is its own.
    provider = build_provider(_settings(srv))
    provider.send_template_batch(make_template(), [make_recipient(1)])
    alias = server_template(make_template()).alias
    again = provider.request("POST", f"{srv.url}/templates", {"X-Postmark-Server-Token": TOKEN},
                             json.dumps(server_template(make_template()).body).encode())
    assert again[0] == 422 and json.loads(again[2])["ErrorCode"] == POSTMARK_ALIAS_TAKEN
    assert alias in srv.templates


# -- through the pipeline ------------------------------------------------------------------------


def _app(tmp_path: Path, srv: FakeProviderServer, readers: int = 7) -> pipeline.App:
    clock = FrozenClock()
    settings = make_settings(tmp_path, delivery={"provider": "postmark", "api_key": TOKEN, "base_url": srv.url,
                                                 "postmark_templates": True, "batch_size": 3, "timeout": 5,
                                                 "max_retries": 0},
                             digest={"approval": {"required": False}})
    app = pipeline.App.open(settings, clock)
    app.store.upsert_subscribers([(f"r{i}@example.com", f"Reader {i}") for i in range(readers)], "cli", clock())
    pipeline.collect(app)
    assert pipeline.make_draft(app).draft is not None
    return app


def test_a_send_creates_the_template_once_and_deletes_it_when_sent(tmp_path: Path,
                                                                   srv: FakeProviderServer) -> None:
    app = _app(tmp_path, srv)
    try:
        (summary,) = pipeline.send(app)
    finally:
        app.close()
    assert summary.finished and summary.sent == 7
    calls = [(r.method, r.path.rsplit("/", 1)[0] if r.method == "DELETE" else r.path) for r in srv.requests]
    assert calls == [("POST", "/templates")] + [("POST", "/email/batchWithTemplates")] * 3 + [
        ("DELETE", "/templates")]
    assert srv.templates == {}
    assert sorted(m["To"] for m in srv.messages) == sorted(f'"Reader {i}" <r{i}@example.com>'.replace('"', "")
                                                           for i in range(7))


def test_a_failed_delete_is_logged_and_the_send_stands(tmp_path: Path, srv: FakeProviderServer,
                                                       monkeypatch: pytest.MonkeyPatch,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    def refuse(self: PostmarkTemplateProvider, template: TemplateMessage, earlier: Sequence[str] = ()) -> None:
        raise DeliveryError("postmark: deleting template x: HTTP 500", hint="delete the template x in Postmark")

    monkeypatch.setattr(PostmarkTemplateProvider, "template_done", refuse)
    app = _app(tmp_path, srv, readers=2)
    try:
        with caplog.at_level(logging.WARNING):
            (summary,) = pipeline.send(app)
        assert summary.finished and app.store.get_draft(summary.draft_id).status == "sent"
    finally:
        app.close()
    assert "template was not cleaned up: postmark: deleting template x: HTTP 500" in caplog.text
    assert "delete the template x in Postmark" in caplog.text


def test_an_unfinished_send_keeps_the_template(tmp_path: Path, srv: FakeProviderServer) -> None:
    app = _app(tmp_path, srv, readers=4)
    srv.faults.extend([("pass",), ("pass",), ("status", 401, {}, {"ErrorCode": 10, "Message": "no"})])
    try:
        (summary,) = pipeline.send(app)
        assert not summary.finished
        assert len(srv.templates) == 1  # the resumed send needs it
        (summary,) = pipeline.send(app)
        assert summary.finished
    finally:
        app.close()
    assert srv.templates == {}
    assert sorted(srv.ledger_ids) == sorted(set(srv.ledger_ids)) and len(srv.ledger_ids) == 4


def test_module_docstring_names_its_sources() -> None:
    doc = postmark_templates.__doc__ or ""
    for source in ("templates-api", "Tokenizer.cs", "1077-template-syntax", "batchWithTemplates"):
        assert source in doc


def test_check_says_sends_create_templates_and_creates_none(provider: PostmarkTemplateProvider,
                                                            srv: FakeProviderServer) -> None:
    line = provider.check()
    assert line.startswith("postmark: reached server") and "server templates on" in line
    assert srv.templates == {} and all(r.method == "GET" for r in srv.requests)


def test_no_templates_endpoint_names_the_base_url(provider: PostmarkTemplateProvider,
                                                  srv: FakeProviderServer) -> None:
    srv.faults.append(("status", 404, {}, {"Message": "Not found"}))
    with pytest.raises(BlockedError) as info:
        provider.send_template_batch(make_template(), [make_recipient(1)])
    assert info.value.hint == "check delivery.base_url" and "creating a template" in str(info.value)


@pytest.mark.parametrize("code", [502, 504])
@pytest.mark.parametrize("gateways", [1, 2])
def test_a_gateway_answering_the_create_is_retried_not_uncertain(tmp_path: Path, srv: FakeProviderServer,
                                                                  code: int, gateways: int) -> None:
    """Creating the template sends no mail: a gateway's 502 or 504 there is a plain retryable
    error, and nobody is left uncertain (a create that went through is found next time). The
    first create comes before any batch is claimed (its failure is only logged); the second,
    the first batch's own, puts the batch back in the queue when it fails too."""
    app = _app(tmp_path, srv, readers=3)  # (no retries: the send pauses at the first failure)
    srv.faults.extend([("gateway", code)] * gateways)  # each create reaches the fake, its answer is lost
    try:
        (summary,) = pipeline.send(app)
        if gateways == 2:
            assert app.store.ledger_counts(summary.draft_id) == {"pending": 3}  # back in the queue
            assert summary.stopped and "kept failing" in summary.stopped
            (summary,) = pipeline.send(app)
        assert summary.finished and app.store.ledger_counts(summary.draft_id) == {"sent": 3}
    finally:
        app.close()
    assert sorted(m["To"] for m in srv.messages) == [f"Reader {i} <r{i}@example.com>" for i in range(3)]


def test_a_rate_limited_read_of_the_alias_is_retried(srv: FakeProviderServer) -> None:
    """Another process took the alias, and reading it meets a 429: a retryable error, not a
    halt saying the template cannot be made."""
    provider = build_provider(_settings(srv))
    assert isinstance(provider, PostmarkTemplateProvider)
    template = make_template()
    other = build_provider(_settings(srv))
    other.send_template_batch(template, [make_recipient(1)])  # another process made it
    srv.faults.extend([("pass",), ("status", 429, {"Retry-After": "1"}, {"ErrorCode": 429, "Message": "slow"})])
    with pytest.raises(DeliveryError) as info:
        provider.send_template_batch(template, [make_recipient(2)])
    assert info.value.retryable and not isinstance(info.value, BlockedError) and info.value.status == 429
    assert provider.send_template_batch(template, [make_recipient(2)])[0].status == "sent"


def test_a_lone_surrogate_in_the_subject_becomes_a_question_mark(provider: PostmarkTemplateProvider,
                                                                 srv: FakeProviderServer) -> None:
    """As in every other request body: a feed's stray "\\ud83d" does not crash the create."""
    template = make_template()
    template = TemplateMessage(**{**template.__dict__, "subject": template.subject + " \ud83d"})
    assert provider.send_template_batch(template, [make_recipient(1)])[0].status == "sent"
    (made,) = srv.templates.values()
    assert made["Subject"].endswith(" ?")


def test_messages_refused_for_the_template_go_back_whatever_the_others_got(provider: PostmarkTemplateProvider,
                                                                          srv: FakeProviderServer) -> None:
    """The template vanished and one reader of the batch is inactive: that reader is
    suppressed, the others were not sent (deferred, back in the queue, not rejected for good),
    and the template is made again for the next batch."""
    template = make_template()
    provider.send_template_batch(template, [make_recipient(1)])
    srv.templates.clear()
    srv.faults.append(("partial", {1: (406, "You tried to send to recipient(s) that have been marked as inactive.")}))
    results = provider.send_template_batch(template, [make_recipient(2), make_recipient(3)])
    assert [(r.ledger_id, r.status) for r in results] == [(2, "deferred"), (3, "suppressed")]
    assert "not sent" in (results[0].error or "") and "template" in (results[0].error or "").lower()
    assert provider.send_template_batch(template, [make_recipient(2)])[0].status == "sent"
    assert len(srv.templates) == 1


# -- cleanup: every template this database's sends made for the draft, and no other ------------

HEX = "0123456789ab"  # an alias's 12 hex digits


def _draft_id(app: pipeline.App) -> int:
    (draft,) = app.store.list_drafts()
    return int(draft.id)


def _put(srv: FakeProviderServer, *aliases: str) -> None:
    for n, alias in enumerate(aliases):
        srv.templates[alias] = {"Alias": alias, "Name": alias, "TemplateId": 4000 + n, "Active": True,
                                "TemplateType": "Standard", "Subject": "s", "HtmlBody": "h", "TextBody": "t"}


def _settings_like(app: pipeline.App, public_url: str) -> pipeline.App:
    """The same database and provider, another public URL: the template's content changes (a
    link slot that HTML escapes differs from its text), and so does its alias."""
    settings = app.settings.model_copy(update={"newsletter": app.settings.newsletter.model_copy(
        update={"public_url": public_url})})
    return pipeline.App.open(settings, FrozenClock())


def test_a_send_finished_after_its_template_changed_removes_both_and_no_one_elses(
        tmp_path: Path, srv: FakeProviderServer) -> None:
    app = _app(tmp_path, srv, readers=4)
    draft_id = _draft_id(app)
    theirs = f"digest-{draft_id}-ffffffffffff"  # another digest's draft with the same id, same server
    _put(srv, theirs, f"digest-{draft_id}2-{HEX}", "welcome-email")
    srv.faults.extend([("pass",), ("pass",), ("status", 401, {}, {"ErrorCode": 10, "Message": "no"})])
    try:
        (summary,) = pipeline.send(app)
        assert not summary.finished and summary.sent == 3  # the template made, a batch sent
        (first,) = set(srv.templates) - {theirs, f"digest-{draft_id}2-{HEX}", "welcome-email"}
        assert app.store.provider_objects(draft_id, "postmark") == [first]
    finally:
        app.close()
    changed = _settings_like(app, "https://news.example.org/a&b")
    try:
        (summary,) = pipeline.send(changed)
        assert summary.finished and summary.sent == 4 - 3
        assert sorted(srv.ledger_ids) == sorted(set(srv.ledger_ids)) and len(srv.ledger_ids) == 4
        assert app.store.provider_objects(draft_id, "postmark") == []  # let go of: records gone too
    finally:
        changed.close()
    deletes = [r.path for r in srv.requests if r.method == "DELETE"]
    assert len(deletes) == 2 and f"/templates/{first}" in deletes  # the current one, then the earlier
    assert sorted(srv.templates) == sorted([theirs, f"digest-{draft_id}2-{HEX}", "welcome-email"])


def test_the_alias_is_recorded_before_the_template_is_made(tmp_path: Path, srv: FakeProviderServer) -> None:
    app = _app(tmp_path, srv, readers=2)
    draft_id = _draft_id(app)
    srv.faults.append(("status", 500, {}, {"ErrorCode": 0, "Message": "down"}))  # the create fails
    create = srv.routes[("POST", "/templates")]
    seen: list[list[str]] = []

    def creating(server: FakeProviderServer, request: Request) -> Reply:
        seen.append(app.store.provider_objects(draft_id, "postmark"))
        return create(server, request)

    srv.route("POST", "/templates", creating)
    try:
        (summary,) = pipeline.send(app)
    finally:
        app.close()
    assert summary.finished and seen and all(len(names) == 1 for names in seen)
    assert seen[0][0].startswith(f"digest-{draft_id}-") and srv.templates == {}


def test_a_failed_delete_of_an_earlier_template_is_logged_once_and_the_send_stands(
        tmp_path: Path, srv: FakeProviderServer, caplog: pytest.LogCaptureFixture) -> None:
    app = _app(tmp_path, srv, readers=2)
    draft_id = _draft_id(app)
    old, older = f"digest-{draft_id}-{HEX}", f"digest-{draft_id}-ffffffffffff"
    _put(srv, old, older)
    app.store.record_provider_objects(draft_id, "postmark", [older, old])
    delete = srv.routes[("DELETE", "/templates/*")]

    def failing_delete(server: FakeProviderServer, request: Request) -> Reply:
        if request.path == f"/templates/{old}":
            return Reply.of_json(500, {"ErrorCode": 0, "Message": "Internal"})
        return delete(server, request)

    srv.route("DELETE", "/templates/*", failing_delete)
    try:
        with caplog.at_level(logging.WARNING):
            (summary,) = pipeline.send(app)
        assert summary.finished and app.store.get_draft(draft_id).status == "sent"
        # Not let go of: still recorded, for the operator to see what is left.
        assert old in app.store.provider_objects(draft_id, "postmark")
    finally:
        app.close()
    assert sorted(srv.templates) == [old]  # the current one and the older one went
    assert f"template was not cleaned up: postmark: deleting template {old}: HTTP 500" in caplog.text
    assert caplog.text.count(f"delete the template {old} in Postmark by hand") == 1  # the hint once


def test_a_dry_run_records_creates_and_deletes_nothing(tmp_path: Path, srv: FakeProviderServer) -> None:
    app = _app(tmp_path, srv, readers=3)
    try:
        _put(srv, f"digest-{_draft_id(app)}-{HEX}")
        before = dict(srv.templates)
        (summary,) = pipeline.send(app, dry_run=True)
        assert summary.dry_run and summary.sent == 3
        assert app.store.provider_objects(_draft_id(app), "postmark") == []
    finally:
        app.close()
    assert srv.requests == [] and srv.templates == before


def _pm_provider() -> PostmarkTemplateProvider:
    return PostmarkTemplateProvider(Delivery(provider="postmark", api_key=TOKEN, base_url="https://pm.test",
                                             timeout=5, postmark_templates=True))


@responses.activate
def test_template_done_deletes_the_current_and_each_earlier_alias_once_and_goes_on_after_a_failure() -> None:
    provider, template = _pm_provider(), make_template()
    (current,) = provider.template_names(template)
    responses.add(responses.DELETE, f"https://pm.test/templates/{current}", json={"ErrorCode": 0})
    responses.add(responses.DELETE, "https://pm.test/templates/digest-1-aaaaaaaaaaaa", status=500,
                  json={"ErrorCode": 0, "Message": "Internal"})
    responses.add(responses.DELETE, "https://pm.test/templates/digest-1-bbbbbbbbbbbb", status=404)
    responses.add(responses.DELETE, "https://pm.test/templates/digest-1-cccccccccccc", status=422,
                  json={"ErrorCode": 1101, "Message": "Template not found."})
    with pytest.raises(DeliveryError) as caught:
        provider.template_done(template, ["digest-1-aaaaaaaaaaaa", current, "digest-1-bbbbbbbbbbbb",
                                          "digest-1-cccccccccccc"])
    assert [c.request.url.rsplit("/", 1)[1] for c in responses.calls] == [
        current, "digest-1-aaaaaaaaaaaa", "digest-1-bbbbbbbbbbbb", "digest-1-cccccccccccc"]
    assert caught.value.hint == "delete the template digest-1-aaaaaaaaaaaa in Postmark by hand"
    assert str(caught.value).count("digest-1-aaaaaaaaaaaa") == 2  # the failure's line, the hint


def test_store_records_provider_objects_per_draft_and_provider(tmp_path: Path) -> None:
    app = pipeline.App.open(make_settings(tmp_path), FrozenClock())
    store = app.store
    try:
        store.record_provider_objects(1, "postmark", ["digest-1-a", "digest-1-b"])
        store.record_provider_objects(1, "postmark", ["digest-1-a"])  # again: one record
        store.record_provider_objects(12, "postmark", ["digest-12-a"])
        store.record_provider_objects(1, "resend", ["r"])
        assert store.provider_objects(1, "postmark") == ["digest-1-a", "digest-1-b"]
        assert store.provider_objects(12, "postmark") == ["digest-12-a"]
        store.forget_provider_objects(1, "postmark", ["digest-1-a"])
        assert store.provider_objects(1, "postmark") == ["digest-1-b"]
        assert store.provider_objects(1, "resend") == ["r"]
    finally:
        app.close()
