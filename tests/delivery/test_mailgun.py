"""MailgunProvider: the form it builds, neutralizing Mailgun's variables, answers, the fake."""

from __future__ import annotations

import base64
import html
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from digest.config import Delivery
from digest.delivery.mime import clean_header_value, format_address
from digest.delivery.providers import mailgun
from digest.delivery.providers.base import PreparedCall, UncertainDeliveryError, expand_template
from digest.delivery.providers.mailgun import (
    EU_API_URL,
    MailgunProvider,
    multipart_form,
    neutralize_html,
    neutralize_text,
)
from digest.delivery.readers import BATCH_HEADERS
from digest.errors import AuthError, ConfigError, DeliveryError
from digest.types import SLOT_NAMES, TemplateMessage, TemplateRecipient
from tests.delivery.conftest import MessageFactory
from tests.delivery.test_provider_contract import make_recipient, make_template
from tests.fakes.provider_server import (
    FakeProviderServer,
    Reply,
    Request,
    install_mailgun,
    parse_form,
)

DATA = Path(__file__).resolve().parents[1] / "data" / "mailgun"
KEY = "key-test"
DOMAIN = "mg.example.org"
ZWSP = "\u200b"


def payload(name: str) -> bytes:
    return (DATA / name).read_bytes()


def settings(**overrides: object) -> Delivery:
    values: dict[str, object] = {"provider": "mailgun", "api_key": KEY, "domain": DOMAIN}
    values.update(overrides)
    return Delivery(**values)  # type: ignore[arg-type]


@pytest.fixture
def provider() -> MailgunProvider:
    return MailgunProvider(settings(base_url="https://mg.test"))


@pytest.fixture
def srv() -> Iterator[FakeProviderServer]:
    with FakeProviderServer(token=KEY) as server:
        install_mailgun(server, DOMAIN)
        yield server


def live(srv: FakeProviderServer, **overrides: object) -> MailgunProvider:
    return MailgunProvider(settings(base_url=srv.url, timeout=5, **overrides))


def form(call: PreparedCall) -> list[tuple[str, str]]:
    request = Request(
        call.method,
        "/",
        "",
        {k.lower(): v for k, v in call.headers.items()},
        call.body,
        len(call.body),
    )
    return parse_form(request)


# -- configuration --------------------------------------------------------------------------


def test_urls_and_auth() -> None:
    us = MailgunProvider(settings())
    assert us.messages_url == f"https://api.mailgun.net/v3/{DOMAIN}/messages"
    eu = MailgunProvider(settings(region="eu"))
    assert eu.messages_url == f"{EU_API_URL}/v3/{DOMAIN}/messages"
    custom = MailgunProvider(settings(region="eu", base_url="http://127.0.0.1:9/"))
    assert custom.messages_url == f"http://127.0.0.1:9/v3/{DOMAIN}/messages"
    token = base64.b64encode(f"api:{KEY}".encode()).decode()
    assert us._auth["Authorization"] == f"Basic {token}"


def test_config_refuses_what_mailgun_would_misread() -> None:
    with pytest.raises(ValueError, match="needs delivery.domain"):
        Delivery(provider="mailgun", api_key=KEY)
    with pytest.raises(ValueError, match="bare domain name"):
        Delivery(provider="mailgun", api_key=KEY, domain="mg.example.org/v3")
    with pytest.raises(ValueError, match="us or eu"):
        Delivery(provider="mailgun", api_key=KEY, domain=DOMAIN, region="eu-west-1")
    with pytest.raises(ConfigError):
        MailgunProvider(Delivery(provider="outbox"))


# -- neutralizing ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "as_html", "as_text"),
    [
        ("%recipient.name%", "&#37;recipient.name%", f"%{ZWSP}recipient.name%"),
        ("%RECIPIENT.x%", "&#37;RECIPIENT.x%", f"%{ZWSP}RECIPIENT.x%"),
        ("%unsubscribe_url%", "&#37;unsubscribe_url%", f"%{ZWSP}unsubscribe_url%"),
        ("%tag_unsubscribe_url%", "&#37;tag_unsubscribe_url%", f"%{ZWSP}tag_unsubscribe_url%"),
        (
            "%mailing_list_unsubscribe_url%",
            "&#37;mailing_list_unsubscribe_url%",
            f"%{ZWSP}mailing_list_unsubscribe_url%",
        ),
        ("%recipient%", "&#37;recipient%", f"%{ZWSP}recipient%"),
        ("%recipient_email%", "&#37;recipient_email%", f"%{ZWSP}recipient_email%"),
        ("%Recipient_FName%", "&#37;Recipient_FName%", f"%{ZWSP}Recipient_FName%"),
        ("%unsubscribe_email%", "&#37;unsubscribe_email%", f"%{ZWSP}unsubscribe_email%"),
        # Left alone: percent-encoding, plain percentages, other words.
        ("https://x.example/a%20b%E2%80%99c", None, None),
        ("50% of readers, 100%recipients", None, None),
        ("%unsubscribe_url", None, None),
        ("%recipient_email", None, None),
        ("%recipient_2%", None, None),
    ],
)
def test_neutralize(raw: str, as_html: str | None, as_text: str | None) -> None:
    assert neutralize_html(raw) == (as_html or raw)
    assert neutralize_text(raw) == (as_text or raw)
    assert html.unescape(neutralize_html(raw)) == raw  # readers see the same text
    assert neutralize_text(raw).replace(ZWSP, "") == raw


def test_multipart_round_trip() -> None:
    fields = [("to", "a@example.com"), ("to", "b@example.com"), ("html", "<p>é\r\n--x</p>\n")]
    body, content_type = multipart_form(fields)
    request = Request("POST", "/", "", {"content-type": content_type}, body, len(body))
    assert parse_form(request) == fields


# -- building -------------------------------------------------------------------------------


def test_full_body_form(provider: MailgunProvider, make_message: MessageFactory) -> None:
    msg = make_message(
        5,
        html="<p>%recipient.ledger_id%</p>",
        text="%unsubscribe_url%",
        reply_to="Editors <editors@news.example.org>",
        tag="digest-7",
    )
    call = provider.build_request([msg])
    fields = form(call)
    single = dict(fields)
    assert [v for k, v in fields if k == "to"] == ["Reader 5 <reader5@example.com>"]
    assert single["from"] == "Field Notes <digest@news.example.org>"
    assert single["h:Reply-To"] == "Editors <editors@news.example.org>"
    assert single["html"] == "<p>&#37;recipient.ledger_id%</p>"
    assert single["text"] == f"%{ZWSP}unsubscribe_url%"
    assert single["o:tag"] == "digest-7"
    assert single["v:draft_id"] == "7"
    assert single["v:ledger_id"] == "%recipient.ledger_id%"
    assert single["h:List-Unsubscribe"] == "%recipient.h:List-Unsubscribe%"
    # The same for every reader: a plain field, in every copy, not one value per reader.
    assert single["h:List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    assert json.loads(single["recipient-variables"]) == {
        "reader5@example.com": {
            "ledger_id": "5",
            "h:List-Unsubscribe": "<https://news.example.org/u/tok0005>",
        }
    }


def test_recipient_variables_are_always_sent(
    provider: MailgunProvider, make_message: MessageFactory
) -> None:
    # Without them Mailgun would put every reader in one To header.
    same = {"html": "<p>x</p>", "text": "x", "headers": ()}
    single = dict(form(provider.build_request([make_message(1, **same), make_message(2, **same)])))
    assert set(json.loads(single["recipient-variables"])) == {
        "reader1@example.com",
        "reader2@example.com",
    }


def test_template_form(provider: MailgunProvider) -> None:
    call, ids = provider.build_template_request(
        make_template(), [make_recipient(1), make_recipient(2)]
    )
    assert ids == (1, 2)
    single = dict(form(call))
    # HTML and text values agree for both readers: one variable per slot serves both parts.
    assert single["html"].startswith("<html><body><p>Hello %recipient.digest_name%,</p>")
    assert 'href="%recipient.digest_unsubscribe_url%"' in single["html"]
    assert single["text"].endswith("Unsubscribe: %recipient.digest_unsubscribe_url%\n")
    variables = json.loads(single["recipient-variables"])
    assert variables["reader2@example.com"]["digest_name"] == "Reader 2"
    assert variables["reader2@example.com"]["ledger_id"] == "2"


def test_a_slot_whose_html_and_text_values_differ_keeps_two_variables(provider: MailgunProvider) -> None:
    ann = make_recipient(2, name="Ann & Bo")
    ann = ann._replace(html_values=("Ann &amp; Bo", *ann.html_values[1:]))
    call, _ids = provider.build_template_request(make_template(), [make_recipient(1), ann])
    single = dict(form(call))
    assert single["html"].startswith("<html><body><p>Hello %recipient.digest_html_name%,</p>")
    assert 'href="%recipient.digest_unsubscribe_url%"' in single["html"]
    assert single["text"].startswith("Hello %recipient.digest_text_name%,")
    variables = json.loads(single["recipient-variables"])["reader2@example.com"]
    assert (variables["digest_html_name"], variables["digest_text_name"]) == ("Ann &amp; Bo", "Ann & Bo")
    assert "digest_html_unsubscribe_url" not in variables


def test_duplicate_and_invalid_addresses_are_refused(provider: MailgunProvider) -> None:
    recipients = [
        make_recipient(1),
        make_recipient(2, email="READER1@example.com"),
        make_recipient(3, email="x"),
    ]
    call, ids = provider.build_template_request(make_template(), recipients)
    assert ids == (1,)
    assert sorted((r.ledger_id, r.status) for r in call.refused) == [(2, "failed"), (3, "invalid")]


HOSTILE_NAMES = [
    'Ann "the Quote" O\'Hara',
    "Back\\slash \\u0041 \\\"",
    "Zoë Müller 日本",
    "%recipient.ledger_id% and %unsubscribe_url%",
    "tab\there, new\nline\r\x00\x1f\x7f",
    "Smith, Jo <jo@evil.example>",
    "",
]


def expected_variables(
    template: TemplateMessage, recipients: list[TemplateRecipient]
) -> dict[str, dict[str, str]]:
    """recipient-variables as Mailgun must read them: per reader, the ledger id, every header
    any reader has ("" where this one has none; the last value of a repeated one), cleaned,
    but for one of BATCH_HEADERS that every reader has with its one value (a plain field), and
    the template's slot values, neutralized: one ``digest_<slot>`` where the HTML and text
    values agree for every reader, else ``digest_html_<slot>`` and ``digest_text_<slot>``."""
    names = list(dict.fromkeys(name for r in recipients for name, _ in r.headers))
    names = [n for n in names if not (n in BATCH_HEADERS and all(dict(r.headers).get(n) == BATCH_HEADERS[n]
                                                                  for r in recipients))]

    def slots(r: TemplateRecipient) -> tuple[dict[str, str], dict[str, str]]:
        html = {s: neutralize_html(v) for s, v in zip(SLOT_NAMES, r.html_values)}
        return html, {s: neutralize_text(v) for s, v in zip(SLOT_NAMES, r.text_values)}

    shared = {s for s in template.html_slots if s in template.text_slots
              and all(slots(r)[0][s] == slots(r)[1][s] for r in recipients)}
    out: dict[str, dict[str, str]] = {}
    for r in recipients:
        given = dict(r.headers)
        values = {"ledger_id": str(r.ledger_id)}
        values |= {f"h:{n}": clean_header_value(given.get(n, "")) for n in names}
        html, text = slots(r)
        values |= {f"digest_{s}" if s in shared else f"digest_html_{s}": html[s] for s in template.html_slots}
        values |= {f"digest_{s}" if s in shared else f"digest_text_{s}": text[s] for s in template.text_slots}
        out[r.to_email] = values
    return out


def test_recipient_variables_json_with_hostile_values(provider: MailgunProvider) -> None:
    # Quotes, backslashes, control characters, non-ASCII and Mailgun variables, in names,
    # slot values and header values, next to readers with nothing to escape.
    recipients = [make_recipient(1)]
    for i, name in enumerate(HOSTILE_NAMES, start=2):
        r = make_recipient(i, name=name or "x")
        recipients.append(
            r._replace(
                to_name=name,
                html_values=(html.escape(name), *r.html_values[1:]),
                text_values=(name, f"https://news.example.org/u/{name}", r.text_values[2]),
                headers=(("List-Unsubscribe", f"<{name}>"), r.headers[1]),
            )
        )
    recipients.append(make_recipient(20, email="o'brien+digest@xn--bcher-kva.example"))
    template = make_template()
    call, ids = provider.build_template_request(template, recipients)
    assert ids == tuple(r.ledger_id for r in recipients)
    fields = form(call)
    assert json.loads(dict(fields)["recipient-variables"]) == expected_variables(
        template, recipients
    )
    tos = [v for k, v in fields if k == "to"]
    assert tos == [
        format_address(neutralize_text(r.to_name), r.to_email) for r in recipients
    ]


def test_every_reader_gets_every_header_key(provider: MailgunProvider) -> None:
    recipients = [
        make_recipient(1)._replace(headers=(("X-A", "a1"),)),
        make_recipient(2)._replace(headers=(("X-B", " b2 "), ("X-A", "a2"))),
        make_recipient(3)._replace(headers=()),
        # A header given twice: the last value, as for any mapping.
        make_recipient(4)._replace(headers=(("X-A", "first"), ("X-A", "last"))),
    ]
    call, ids = provider.build_template_request(make_template(), recipients)
    assert ids == (1, 2, 3, 4)
    fields = form(call)
    header_fields = [(k, v) for k, v in fields if k.startswith("h:")]
    assert header_fields == [("h:X-A", "%recipient.h:X-A%"), ("h:X-B", "%recipient.h:X-B%")]
    variables = json.loads(dict(fields)["recipient-variables"])
    assert variables == expected_variables(make_template(), recipients)
    assert [(v["h:X-A"], v["h:X-B"]) for v in variables.values()] == [
        ("a1", ""), ("a2", "b2"), ("", ""), ("last", ""),
    ]


@pytest.mark.parametrize("build", ["full bodies", "template"])
def test_one_click_is_one_field_for_the_call(provider: MailgunProvider, make_message: MessageFactory,
                                             build: str) -> None:
    """List-Unsubscribe-Post is the same for every reader: one plain h: field, which Mailgun puts
    in every copy (APIS.md A.3); List-Unsubscribe stays each reader's own."""
    if build == "full bodies":
        call = provider.build_request([make_message(1, html="<p>x</p>", text="x"),
                                       make_message(2, html="<p>x</p>", text="x")])
    else:
        call, _ids = provider.build_template_request(make_template(), [make_recipient(1), make_recipient(2)])
    fields = form(call)
    header_fields = [(k, v) for k, v in fields if k.startswith("h:")]
    assert ("h:List-Unsubscribe-Post", "List-Unsubscribe=One-Click") in header_fields
    assert ("h:List-Unsubscribe", "%recipient.h:List-Unsubscribe%") in header_fields
    for values in json.loads(dict(fields)["recipient-variables"]).values():
        assert "h:List-Unsubscribe-Post" not in values and values["h:List-Unsubscribe"].startswith("<https://")


@pytest.mark.parametrize("other", [None, "List-Unsubscribe=Something-Else"])
def test_one_click_goes_per_reader_when_a_reader_differs(provider: MailgunProvider, other: str | None) -> None:
    """A reader without the header, or with another value: each reader's own value again (a
    plain field would give the odd one the others' value)."""
    odd = make_recipient(2)
    headers = tuple((n, v) if n != "List-Unsubscribe-Post" else (n, other or "") for n, v in odd.headers
                    if other is not None or n != "List-Unsubscribe-Post")
    recipients = [make_recipient(1), odd._replace(headers=headers)]
    call, _ids = provider.build_template_request(make_template(), recipients)
    fields = form(call)
    assert ("h:List-Unsubscribe-Post", "%recipient.h:List-Unsubscribe-Post%") in fields
    variables = json.loads(dict(fields)["recipient-variables"])
    assert [v["h:List-Unsubscribe-Post"] for v in variables.values()] == ["List-Unsubscribe=One-Click", other or ""]
    assert variables == expected_variables(make_template(), recipients)


def test_refusals_keep_their_order_and_reasons(provider: MailgunProvider) -> None:
    good = make_recipient(1)
    recipients = [
        good,
        make_recipient(2)._replace(headers=(("Bad Name", "x"),)),  # invalid header name
        make_recipient(3)._replace(html_values=("only one",)),  # wrong slot count
        make_recipient(4, email="reader1@EXAMPLE.com"),  # the same address as reader 1
        make_recipient(5, email="not an address"),
        make_recipient(6)._replace(headers=(("Subject", "x"),)),  # reserved
        make_recipient(7, email="reader2@example.com"),  # reader 2 was refused: fine
        make_recipient(8, name="\udc80"),  # cannot be encoded in a To header
    ]
    call, ids = provider.build_template_request(make_template(), recipients)
    assert ids == (1, 7)
    assert [(r.ledger_id, r.status) for r in call.refused] == [
        (3, "invalid"),
        (2, "invalid"),
        (4, "failed"),
        (5, "invalid"),
        (6, "invalid"),
        (8, "invalid"),
    ]
    reasons = {r.ledger_id: r.error or "" for r in call.refused}
    assert "slot values" in reasons[3]
    assert "invalid header name" in reasons[2]
    assert reasons[4] == "the same address twice in one batch"
    assert "set from the message's own fields" in reasons[6]
    variables = json.loads(dict(form(call))["recipient-variables"])
    assert set(variables) == {"reader1@example.com", "reader2@example.com"}
    assert variables["reader2@example.com"]["ledger_id"] == "7"
    assert variables["reader2@example.com"]["digest_name"] == "Reader 7"


def test_no_reader_left(provider: MailgunProvider) -> None:
    call, ids = provider.build_template_request(make_template(), [make_recipient(1, email="x")])
    assert ids == ()
    fields = form(call)
    assert [k for k, _ in fields if k == "to" or k.startswith("h:")] == []
    assert json.loads(dict(fields)["recipient-variables"]) == {}


@pytest.mark.parametrize(
    "name",
    ["Reader 1", "", "  padded  ", "J. Smith", "Smith, Jo", 'Ann "Q"', "Zoë", "a\r\nBcc: x", "x@y"],
)
def test_to_field_is_format_address(name: str) -> None:
    assert mailgun._to_field(name, "reader@example.com") == format_address(
        name, "reader@example.com"
    )


def test_boundary_never_occurs_in_a_value(monkeypatch: pytest.MonkeyPatch) -> None:
    tokens = iter(["a" * 32, "b" * 32])
    monkeypatch.setattr(mailgun.secrets, "token_hex", lambda n: next(tokens))
    fields = [("to", "x@example.com"), ("to", f"digest-{'a' * 32}@example.com"), ("html", "<p>")]
    body, content_type = multipart_form(fields)
    assert content_type.endswith("boundary=digest-" + "b" * 32)
    request = Request("POST", "/", "", {"content-type": content_type}, body, len(body))
    assert parse_form(request) == fields


# -- against the fake -------------------------------------------------------------------------


def test_injection_content_reaches_readers_literally(srv: FakeProviderServer) -> None:
    comment = "Mailgun fills %recipient.name% and %recipient.unsubscribe_url% and %unsubscribe_url%"
    template = make_template(comment=comment, subject="Re: %recipient.name%")
    recipients = [make_recipient(1, name="Ann"), make_recipient(2, name="%recipient.ledger_id%")]
    results = live(srv).send_template_batch(template, recipients)
    assert [r.status for r in results] == ["sent", "sent"]
    assert len(srv.requests) == 1
    for r, got in zip(recipients, srv.messages):
        expected = expand_template(template, r)
        assert html.unescape(got["html"]) == html.unescape(expected.html)
        assert got["text"].replace(ZWSP, "") == expected.text
        assert comment in got["text"].replace(ZWSP, "")
        assert "mailgun.fake/unsubscribe" not in got["html"] + got["text"]
        assert got["subject"].replace(ZWSP, "") == "Re: %recipient.name%"
        assert got["headers"]["List-Unsubscribe"] == dict(r.headers)["List-Unsubscribe"]
        assert got["to_header"].endswith(f"<{r.to_email}>")  # nobody sees the others
        assert got["to_header"].count("@") == 1
        assert got["variables"] == {"draft_id": "7", "ledger_id": str(r.ledger_id)}
    assert "Hello &#37;recipient.ledger_id%," in srv.messages[1]["html"]  # a hostile name too


def test_full_body_batch_against_the_fake(
    srv: FakeProviderServer, make_message: MessageFactory
) -> None:
    messages = [make_message(1, html="<p>%recipient.name%</p>"), make_message(2)]
    results = live(srv).send_batch(messages)
    assert [r.status for r in results] == ["sent", "sent"]
    assert srv.ledger_ids == [1, 2]
    assert html.unescape(srv.messages[0]["html"]) == "<p>%recipient.name%</p>"


def test_wrong_path_magnificent_api(srv: FakeProviderServer, make_message: MessageFactory) -> None:
    srv.route(
        "POST",
        "/v3/other.example/messages",
        lambda s, r: Reply(200, payload("magnificent.txt"), content_type="text/plain"),
    )
    with pytest.raises(DeliveryError) as info:
        live(srv, domain="other.example").send_batch([make_message(1)])
    assert not info.value.retryable and "Magnificent" in str(info.value)
    assert info.value.hint and "delivery.region" in info.value.hint


def test_unknown_domain_is_a_404_with_a_region_hint(
    srv: FakeProviderServer, make_message: MessageFactory
) -> None:
    srv.route(
        "POST",
        "/v3/eu-only.example/messages",
        lambda s, r: Reply(404, payload("error_404_domain.json")),
    )
    with pytest.raises(DeliveryError) as info:
        live(srv, domain="eu-only.example").send_batch([make_message(1)])
    assert info.value.status == 404 and not info.value.retryable
    assert "Domain not found" in str(info.value) and "region" in (info.value.hint or "")


# -- answers ----------------------------------------------------------------------------------


def test_queued_is_sent_with_one_id(
    provider: MailgunProvider, make_message: MessageFactory
) -> None:
    results = provider.handle_response(
        200, {}, payload("queued.json"), [make_message(1), make_message(2)]
    )
    assert [(r.status, r.provider_message_id) for r in results] == [
        ("sent", "<20261126090000.1.5E5A1B2C3D4E5F60@mg.example.org>")
    ] * 2


def test_400_is_permanent(provider: MailgunProvider, make_message: MessageFactory) -> None:
    with pytest.raises(DeliveryError, match="not a valid address") as info:
        provider.handle_response(400, {}, payload("error_400_to.json"), [make_message(1)])
    assert not info.value.retryable


def test_200_without_an_id_is_uncertain(
    provider: MailgunProvider, make_message: MessageFactory
) -> None:
    with pytest.raises(UncertainDeliveryError):
        provider.handle_response(200, {}, b"<html>proxy</html>", [make_message(1)])
    with pytest.raises(UncertainDeliveryError):
        provider.handle_response(200, {}, b'{"message": "Queued"}', [make_message(1)])


def test_401_is_auth(provider: MailgunProvider, make_message: MessageFactory) -> None:
    with pytest.raises(AuthError):
        provider.handle_response(401, {}, b"Forbidden", [make_message(1)])


def test_check(srv: FakeProviderServer) -> None:
    assert live(srv).check() == f"mailgun: reached domain '{DOMAIN}' at {srv.url}"
    with pytest.raises(DeliveryError, match="not found"):
        live(srv, domain="nowhere.example").check()
    with pytest.raises(AuthError):
        MailgunProvider(settings(base_url=srv.url, api_key="wrong")).check()
