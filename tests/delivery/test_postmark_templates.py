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
import re
import threading
from collections.abc import Iterator, Sequence
from dataclasses import replace
from html import escape
from pathlib import Path
from urllib.parse import parse_qsl, urlsplit

import pytest
import requests
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
        ("DELETE", "/templates"), ("GET", "/templates")]  # the draft's template, then the list
    assert srv.templates == {}
    assert sorted(m["To"] for m in srv.messages) == sorted(f'"Reader {i}" <r{i}@example.com>'.replace('"', "")
                                                           for i in range(7))


def test_a_failed_delete_is_logged_and_the_send_stands(tmp_path: Path, srv: FakeProviderServer,
                                                       monkeypatch: pytest.MonkeyPatch,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    def refuse(self: PostmarkTemplateProvider, template: TemplateMessage) -> None:
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
    for source in ("templates-api", "Tokenizer.cs", "1077-template-syntax", "batchWithTemplates",
                   "GetTemplatesAsync", "TemplateInList"):
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


# -- cleanup: every template of the draft, not only the current one -----------------------------

PM = "https://pm.test"
HEX = "0123456789ab"  # an alias's 12 hex digits


def _pm_provider() -> PostmarkTemplateProvider:
    return PostmarkTemplateProvider(Delivery(provider="postmark", api_key=TOKEN, base_url=PM, timeout=5,
                                             postmark_templates=True))


def _entry(alias: str | None, template_id: int = 1, kind: str = "Standard") -> dict[str, object]:
    return {"Active": True, "TemplateId": template_id, "Name": f"t{template_id}", "Alias": alias,
            "TemplateType": kind, "LayoutTemplate": None}


def _serve(entries: Sequence[object], *, page_cap: int | None = None, total: bool = True,
           deletes: dict[str, tuple[int, object]] | None = None) -> None:
    """``responses`` as Postmark: GET /templates pages through ``entries`` (at most ``page_cap``
    a page, whatever Count asks), DELETE /templates/{alias} answers 200 or ``deletes[alias]``."""

    def listing(request: requests.PreparedRequest) -> tuple[int, dict[str, str], str]:
        query = dict(parse_qsl(urlsplit(request.url or "").query))
        count, offset = int(query["Count"]), int(query["Offset"])
        body: dict[str, object] = {"Templates": entries[offset:offset + min(count, page_cap or count)]}
        if total:
            body["TotalCount"] = len(entries)
        return 200, {}, json.dumps(body)

    def delete(request: requests.PreparedRequest) -> tuple[int, dict[str, str], str]:
        alias = (request.url or "").rpartition("/")[2]
        status, body = (deletes or {}).get(alias, (200, {"ErrorCode": 0, "Message": "removed"}))
        return status, {}, json.dumps(body)

    responses.add_callback(responses.GET, f"{PM}/templates", callback=listing)
    responses.add_callback(responses.DELETE, re.compile(rf"{re.escape(PM)}/templates/.+"), callback=delete)


def _deleted() -> list[str]:
    return [(c.request.url or "").rpartition("/")[2] for c in responses.calls if c.request.method == "DELETE"]


def _listed() -> list[dict[str, str]]:
    return [dict(parse_qsl(urlsplit(c.request.url or "").query))
            for c in responses.calls if c.request.method == "GET"]


@responses.activate
def test_cleanup_reads_every_page_then_deletes_the_drafts_other_templates() -> None:
    template = make_template(draft_id=7)
    current = server_template(template).alias
    entries = [_entry(f"other-{i}", i) for i in range(250)]
    for at, digits in ((5, "aaaaaaaaaaaa"), (140, "bbbbbbbbbbbb"), (249, "cccccccccccc")):
        entries[at] = _entry(f"digest-7-{digits}", at)  # one on each page
    _serve(entries)
    _pm_provider().template_done(template)
    assert [(q["Count"], q["Offset"], q["TemplateType"]) for q in _listed()] == [
        ("100", "0", "Standard"), ("100", "100", "Standard"), ("100", "200", "Standard")]
    # The current one first, as before; the others only once every page was read.
    assert [c.request.method for c in responses.calls] == ["DELETE", "GET", "GET", "GET", "DELETE", "DELETE",
                                                           "DELETE"]
    assert _deleted() == [current, "digest-7-aaaaaaaaaaaa", "digest-7-bbbbbbbbbbbb", "digest-7-cccccccccccc"]
    assert all(c.request.headers["X-Postmark-Server-Token"] == TOKEN for c in responses.calls)


@responses.activate
def test_cleanup_deletes_only_this_drafts_templates() -> None:
    template = make_template(draft_id=1)
    current = server_template(template).alias
    ours = [f"digest-1-{HEX}", "digest-1-ffffffffffff"]
    not_ours = [f"digest-12-{HEX}", f"digest-10-{HEX}", f"digest-2-{HEX}", f"digest-01-{HEX}", "digest-1-",
                "digest-1-0123456789a", f"digest-1-{HEX}0", f"digest-1-{HEX}-x", "digest-1-0123456789AB",
                "digest-1-0123456789ag", f"xdigest-1-{HEX}", f"Digest-1-{HEX}", "digest-1", "welcome-email",
                "digest-7-aaaaaaaaaaaa", ""]
    entries: list[object] = [_entry(alias, i) for i, alias in enumerate(not_ours + ours)]
    entries += [_entry(None, 900), {"TemplateId": 901, "Name": "no alias key"}, "not an object",
                _entry("digest-1-dddddddddddd", 902, kind="Layout")]  # a layout is never one of ours
    _serve(entries)
    _pm_provider().template_done(template)
    assert _deleted() == [current, *ours]


@responses.activate
def test_cleanup_follows_a_server_that_pages_smaller_than_asked() -> None:
    entries = [_entry(f"other-{i}", i) for i in range(70)] + [_entry(f"digest-7-{HEX}", 70)]
    _serve(entries, page_cap=30)  # TotalCount 71: a short page does not end the list
    _pm_provider().template_done(make_template(draft_id=7))
    assert [q["Offset"] for q in _listed()] == ["0", "30", "60"]
    assert _deleted()[1:] == [f"digest-7-{HEX}"]


@responses.activate
def test_cleanup_without_a_total_ends_at_a_short_page() -> None:
    entries = [_entry(f"other-{i}", i) for i in range(100)] + [_entry(f"digest-7-{HEX}", 100)]
    _serve(entries, total=False)
    _pm_provider().template_done(make_template(draft_id=7))
    assert [q["Offset"] for q in _listed()] == ["0", "100"]
    assert _deleted()[1:] == [f"digest-7-{HEX}"]


@responses.activate
def test_a_list_without_end_is_read_at_most_LIST_PAGES_pages() -> None:
    full = {"TotalCount": 10**9, "Templates": [_entry(f"digest-7-{HEX}")] + [_entry(f"x{i}") for i in range(99)]}
    responses.add(responses.GET, f"{PM}/templates", json=full)
    responses.add(responses.DELETE, re.compile(rf"{re.escape(PM)}/templates/.+"), json={"ErrorCode": 0})
    with pytest.raises(DeliveryError) as info:
        _pm_provider().template_done(make_template(draft_id=7))
    assert len(_listed()) == postmark_templates.LIST_PAGES == 100
    assert "no end after 100 pages" in str(info.value)
    assert _deleted()[1:] == [f"digest-7-{HEX}"]  # what it found is deleted all the same, once


@pytest.mark.parametrize(("reply", "says"), [
    ({"status": 500, "json": {"ErrorCode": 500, "Message": "oops"}}, "listing templates: HTTP 500, ErrorCode 500"),
    ({"status": 200, "body": "<html>not json</html>"}, "listing templates: the answer holds no list"),
    ({"status": 200, "json": {"TotalCount": 3, "Templates": "nope"}}, "listing templates: the answer holds no list"),
    ({"status": 401, "json": {"ErrorCode": 10, "Message": "Bad token"}}, "listing templates: HTTP 401, ErrorCode 10"),
    ({"body": requests.ConnectionError("connection reset")}, "postmark: calling https://pm.test/templates?Count="),
])
@responses.activate
def test_a_failed_listing_still_deletes_the_current_template_and_says_what_to_remove(
        reply: dict[str, object], says: str) -> None:
    template = make_template(draft_id=7)
    responses.add(responses.DELETE, re.compile(rf"{re.escape(PM)}/templates/.+"), json={"ErrorCode": 0})
    responses.add(responses.GET, f"{PM}/templates", **reply)  # type: ignore[arg-type]
    with pytest.raises(DeliveryError) as info:
        _pm_provider().template_done(template)
    assert _deleted() == [server_template(template).alias]
    assert says in str(info.value)
    assert info.value.hint == "delete any template whose alias starts with digest-7- in Postmark by hand"


@responses.activate
def test_one_failed_delete_stops_none_of_the_others(caplog: pytest.LogCaptureFixture) -> None:
    template = make_template(draft_id=7)
    current = server_template(template).alias
    old = [f"digest-7-{c * 12}" for c in "abcde"]
    _serve([_entry(alias, i) for i, alias in enumerate(old)],
           deletes={old[1]: (500, {"ErrorCode": 0, "Message": "Internal"}),
                    old[2]: (404, {"ErrorCode": 1101, "Message": "Template not found."}),  # gone: fine
                    old[3]: (422, {"ErrorCode": 1101, "Message": "Template not found."})})
    with caplog.at_level(logging.INFO, logger="digest.delivery.providers.postmark_templates"), \
            pytest.raises(DeliveryError) as info:
        _pm_provider().template_done(template)
    assert _deleted() == [current, *old]
    assert str(info.value.args[0]) == f"postmark: deleting template {old[1]}: HTTP 500, ErrorCode 0: Internal"
    assert info.value.hint == f"delete the template {old[1]} in Postmark by hand"
    assert info.value.status == 500
    for alias in (current, old[0], old[4]):
        assert f"postmark: deleted template {alias}" in caplog.text


@responses.activate
def test_a_failed_delete_of_the_current_template_is_reported_as_before_and_the_rest_goes_on() -> None:
    template = make_template(draft_id=7)
    current = server_template(template).alias
    _serve([_entry(f"digest-7-{HEX}"), _entry(current, 2), _entry("digest-7-ffffffffffff", 3)],
           deletes={current: (500, {"ErrorCode": 0, "Message": "Internal"}),
                    "digest-7-ffffffffffff": (403, {"ErrorCode": 10, "Message": "no"})})
    with pytest.raises(DeliveryError) as info:
        _pm_provider().template_done(template)
    # Listed again, the current one is not asked a second time.
    assert _deleted() == [current, f"digest-7-{HEX}", "digest-7-ffffffffffff"]
    assert str(info.value.args[0]) == (f"postmark: deleting template {current}: HTTP 500, ErrorCode 0: Internal; "
                                       "postmark: deleting template digest-7-ffffffffffff: HTTP 403, "
                                       "ErrorCode 10: no")
    assert info.value.hint == f"delete the templates {current}, digest-7-ffffffffffff in Postmark by hand"


@responses.activate
def test_failed_deletes_and_a_failed_listing_are_one_error() -> None:
    template = make_template(draft_id=7)
    current = server_template(template).alias
    responses.add(responses.DELETE, re.compile(rf"{re.escape(PM)}/templates/.+"), status=500,
                  json={"ErrorCode": 0, "Message": "Internal"})
    responses.add(responses.GET, f"{PM}/templates", status=503, body="unavailable")
    with pytest.raises(DeliveryError) as info:
        _pm_provider().template_done(template)
    assert "listing templates: HTTP 503" in str(info.value)
    assert info.value.hint == (f"delete the template {current} in Postmark by hand, and any other template whose "
                               "alias starts with digest-7-")


def test_the_fake_lists_templates_a_page_at_a_time(srv: FakeProviderServer) -> None:
    provider = build_provider(_settings(srv))
    headers = {"X-Postmark-Server-Token": TOKEN}
    for i in range(5):
        srv.templates[f"t{i}"] = {"Alias": f"t{i}", "TemplateId": i, "Name": f"T{i}", "Active": True,
                                  "TemplateType": "Layout" if i == 4 else "Standard"}
    srv.templates["42"] = {"Alias": None, "TemplateId": 42, "Name": "no alias", "Active": True}

    def listed(query: str) -> tuple[int, object]:
        status, _headers, body = provider.request("GET", f"{srv.url}/templates?{query}", headers)
        return status, json.loads(body)

    status, page = listed("Count=2&Offset=1")
    assert status == 200 and page == {"TotalCount": 6, "Templates": [
        {"Active": True, "TemplateId": 1, "Name": "T1", "Alias": "t1", "TemplateType": "Standard",
         "LayoutTemplate": None},
        {"Active": True, "TemplateId": 2, "Name": "T2", "Alias": "t2", "TemplateType": "Standard",
         "LayoutTemplate": None}]}
    status, page = listed("count=10&offset=0&templateType=Standard")  # names in any case
    assert status == 200 and page["TotalCount"] == 5  # type: ignore[index]
    assert [t["Alias"] for t in page["Templates"]] == ["t0", "t1", "t2", "t3", None]  # type: ignore[index]
    for bad in ("Offset=0", "Count=0&Offset=0", "Count=501&Offset=0", "Count=x&Offset=0", "Count=5",
                "Count=5&Offset=-1", "Count=5&Offset=0&TemplateType=Other"):
        assert listed(bad)[0] == 422, bad
    assert provider.request("GET", f"{srv.url}/templates/t1", headers)[0] == 200  # one template, as before
    assert provider.request("GET", f"{srv.url}/templates/42", headers)[0] == 200


def _draft_id(app: pipeline.App) -> int:
    (draft,) = app.store.list_drafts()
    return int(draft.id)


def _other_templates(srv: FakeProviderServer, draft_id: int) -> dict[str, dict[str, object]]:
    """The server's templates before the send: the draft's own under an earlier alias, one of
    another draft whose id begins with the same digit, the operator's own, one without alias."""
    made = {f"digest-{draft_id}-{HEX}": "an earlier alias of the draft's",
            f"digest-{draft_id}2-{HEX}": "another draft's", "welcome-email": "the operator's", "4242": None}
    for i, (key, name) in enumerate(made.items()):
        srv.templates[key] = {"Alias": None if name is None else key, "Name": name or "no alias",
                              "TemplateId": 4000 + i, "Active": True, "TemplateType": "Standard",
                              "Subject": "s", "HtmlBody": "h", "TextBody": "t"}
    return {key: srv.templates[key] for key in made}


def test_a_finished_send_removes_the_drafts_template_made_under_an_earlier_alias(
        tmp_path: Path, srv: FakeProviderServer) -> None:
    app = _app(tmp_path, srv, readers=4)
    try:
        draft_id = _draft_id(app)
        before = _other_templates(srv, draft_id)
        (summary,) = pipeline.send(app)
        assert summary.finished and summary.sent == 4
    finally:
        app.close()
    assert srv.templates == {key: value for key, value in before.items() if key != f"digest-{draft_id}-{HEX}"}
    assert sorted(srv.templates) == sorted([f"digest-{draft_id}2-{HEX}", "welcome-email", "4242"])


def test_a_failed_delete_of_an_earlier_template_is_logged_and_the_send_stands(
        tmp_path: Path, srv: FakeProviderServer, caplog: pytest.LogCaptureFixture) -> None:
    app = _app(tmp_path, srv, readers=2)
    draft_id = _draft_id(app)
    _other_templates(srv, draft_id)
    old = f"digest-{draft_id}-{HEX}"
    newer = f"digest-{draft_id}-ffffffffffff"  # deleted all the same
    srv.templates[newer] = {**srv.templates[old], "Alias": newer}
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
    finally:
        app.close()
    assert sorted(srv.templates) == sorted([old, f"digest-{draft_id}2-{HEX}", "welcome-email", "4242"])
    assert f"template was not cleaned up: postmark: deleting template {old}: HTTP 500" in caplog.text
    assert caplog.text.count(f"delete the template {old} in Postmark by hand") == 1  # the hint once


def test_a_dry_run_lists_and_deletes_nothing(tmp_path: Path, srv: FakeProviderServer) -> None:
    app = _app(tmp_path, srv, readers=3)
    try:
        before = dict(_other_templates(srv, _draft_id(app)))
        (summary,) = pipeline.send(app, dry_run=True)
        assert summary.dry_run and summary.sent == 3
    finally:
        app.close()
    assert srv.requests == [] and srv.templates == before
