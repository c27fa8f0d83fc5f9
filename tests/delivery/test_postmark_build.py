"""PostmarkProvider.build_request (pure) and the JSON escaping it relies on."""

from __future__ import annotations

import email.header
import email.utils
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from digest.config import Delivery
from digest.delivery.providers.base import json_escape, json_string
from digest.delivery.providers.postmark import PostmarkProvider
from digest.errors import ConfigError, DeliveryError
from digest.http import BodyParts
from tests.delivery.conftest import TOKEN, MessageFactory


@pytest.fixture
def provider(postmark_settings: Delivery) -> PostmarkProvider:
    return PostmarkProvider(postmark_settings)


def test_request_line_and_headers(provider: PostmarkProvider, make_message: MessageFactory) -> None:
    call = provider.build_request([make_message(1)])
    assert call.method == "POST"
    assert call.url == "https://pm.test/email/batch"
    assert call.headers == {
        "X-Postmark-Server-Token": TOKEN,
        "Accept": "application/json",
        "Content-Type": "application/json",
    }


def test_default_base_url() -> None:
    provider = PostmarkProvider(Delivery(provider="postmark", api_key="t"))
    assert provider.batch_url == "https://api.postmarkapp.com/email/batch"
    trailing = PostmarkProvider(
        Delivery(provider="postmark", api_key="t", base_url="https://eu.example/")
    )
    assert trailing.batch_url == "https://eu.example/email/batch"


def test_payload_shape(provider: PostmarkProvider, make_message: MessageFactory) -> None:
    msg = make_message(
        41,
        draft_id=9,
        reply_to="Editor <editor@news.example.org>",
        tag="weekly-digest",
        message_id="<ignored@news.example.org>",
    )
    call = provider.build_request([msg])
    assert call.messages == (msg,) and call.refused == ()
    (item,) = json.loads(call.body)
    assert item == {
        "From": "Field Notes <digest@news.example.org>",
        "To": "Reader 41 <reader41@example.com>",
        "Subject": "Field Notes Digest: The slow build",
        "HtmlBody": msg.html,
        "TextBody": msg.text,
        "MessageStream": "broadcast",
        "Tag": "weekly-digest",
        "Metadata": {"ledger_id": "41", "draft_id": "9"},
        "Headers": [
            {"Name": "List-Unsubscribe", "Value": "<https://news.example.org/u/tok0041>"},
            {"Name": "List-Unsubscribe-Post", "Value": "List-Unsubscribe=One-Click"},
        ],
        "ReplyTo": "Editor <editor@news.example.org>",
    }


def test_batch_keeps_order_and_per_message_values(
    provider: PostmarkProvider, make_message: MessageFactory
) -> None:
    messages = [make_message(i) for i in range(1, 6)]
    items = json.loads(provider.build_request(messages).body)
    assert [i["Metadata"]["ledger_id"] for i in items] == ["1", "2", "3", "4", "5"]
    assert [i["To"] for i in items] == [f"Reader {i} <reader{i}@example.com>" for i in range(1, 6)]
    assert [i["Headers"][0]["Value"] for i in items] == [
        f"<https://news.example.org/u/tok{i:04d}>" for i in range(1, 6)
    ]
    assert all(i["HtmlBody"] == m.html for i, m in zip(items, messages))


def test_optional_fields_are_left_out(
    provider: PostmarkProvider, make_message: MessageFactory
) -> None:
    (item,) = json.loads(
        provider.build_request([make_message(1, tag="", html="", headers=(), to_name="")]).body
    )
    assert (
        "Tag" not in item
        and "HtmlBody" not in item
        and "Headers" not in item
        and "ReplyTo" not in item
    )
    assert item["To"] == "reader1@example.com"


def test_message_stream_comes_from_settings(make_message: MessageFactory) -> None:
    provider = PostmarkProvider(
        Delivery(provider="postmark", api_key="t", message_stream="digest-broadcast")
    )
    (item,) = json.loads(provider.build_request([make_message(1)]).body)
    assert item["MessageStream"] == "digest-broadcast"


def test_no_message_id_header_is_passed(
    provider: PostmarkProvider, make_message: MessageFactory
) -> None:
    # Postmark assigns its own Message-ID; ours is only for the outbox and SMTP.
    (item,) = json.loads(provider.build_request([make_message(1, message_id="<x@y.example>")]).body)
    assert all(h["Name"].lower() != "message-id" for h in item["Headers"])
    with pytest.raises(ValueError):
        provider.build_request([make_message(1, headers=(("Message-ID", "<x@y.example>"),))])


def test_non_ascii_name_and_subject(
    provider: PostmarkProvider, make_message: MessageFactory
) -> None:
    (item,) = json.loads(
        provider.build_request([make_message(1, to_name="Zoë Ñúñez", subject="Café — 日本")]).body
    )
    assert item["Subject"] == "Café — 日本"
    decoded = str(email.header.make_header(email.header.decode_header(item["To"])))
    assert email.utils.parseaddr(decoded) == ("Zoë Ñúñez", "reader1@example.com")


def test_header_injection_is_cleaned(
    provider: PostmarkProvider, make_message: MessageFactory
) -> None:
    msg = make_message(
        1,
        subject="Hi\r\nBcc: victim@example.net",
        to_name="Eve\nBcc: victim@example.net",
        headers=(("List-Unsubscribe", "<https://x.example/u/1>\r\nBcc: victim@example.net"),),
    )
    (item,) = json.loads(provider.build_request([msg]).body)
    assert item["Subject"] == "Hi Bcc: victim@example.net"
    assert item["To"] == '"Eve Bcc: victim@example.net" <reader1@example.com>'
    assert item["Headers"][0]["Value"] == "<https://x.example/u/1> Bcc: victim@example.net"


def test_invalid_recipient_is_refused_not_sent(
    provider: PostmarkProvider, make_message: MessageFactory
) -> None:
    call = provider.build_request(
        [make_message(1), make_message(2, to_email="broken"), make_message(3)]
    )
    assert [m.ledger_id for m in call.messages] == [1, 3]
    assert [(r.ledger_id, r.status) for r in call.refused] == [(2, "invalid")]
    assert [i["Metadata"]["ledger_id"] for i in json.loads(call.body)] == ["1", "3"]


def test_bad_from_fails_the_whole_call(
    provider: PostmarkProvider, make_message: MessageFactory
) -> None:
    with pytest.raises(DeliveryError, match="bad from address") as info:
        provider.build_request([make_message(1, from_addr="Field Notes <not an address>")])
    assert not info.value.retryable
    assert info.value.hint == "check newsletter.from"


def test_missing_token_is_a_config_error() -> None:
    settings = Delivery.model_construct(provider="postmark", api_key=None)
    with pytest.raises(ConfigError, match="api_key"):
        PostmarkProvider(settings)


def test_large_bodies_round_trip(provider: PostmarkProvider, make_message: MessageFactory) -> None:
    html = ('<td style="font-family:Georgia">“Quoted” — \\ back\tslash</td>\r\n' * 600)[:30_000]
    messages = [make_message(i, html=html + str(i), text=html[:5000]) for i in range(1, 51)]
    items = json.loads(provider.build_request(messages).body)
    assert [i["HtmlBody"] for i in items] == [m.html for m in messages]


TRICKY = [
    "",
    "plain",
    'quote " and backslash \\ and \\" together',
    "newline\nreturn\rtab\t",
    "controls \x00\x01\x0b\x0c\x1f and DEL \x7f",
    "unicode é — 日本 😀 \u2028 \u2029",
    "</script><!-- -->",
]


@pytest.mark.parametrize("value", TRICKY)
def test_json_escape_matches_json_dumps(value: str) -> None:
    assert json_escape(value) == json.dumps(value, ensure_ascii=False)[1:-1].encode()
    assert json.loads(json_string(value)) == value


@given(st.text())
def test_json_escape_round_trips_any_text(value: str) -> None:
    assert json.loads(json_string(value)) == value


def test_json_escape_replaces_lone_surrogates() -> None:
    assert json.loads(json_string("a\ud800b")) == "a?b"


@pytest.mark.parametrize("pad", ["", "<p>long shared text</p>" * 200], ids=["small parts", "large parts"])
def test_template_batch_body_equals_the_full_body_batch(pad: str) -> None:
    """The template path is an optimisation only: the same JSON, message by message (with
    shared parts small enough to be copied, and large enough to be sent by reference)."""
    import json as _json

    from digest.config import Delivery
    from digest.delivery.providers.postmark import PostmarkProvider
    from digest.delivery.sender import list_headers
    from digest.types import OutgoingMessage, TemplateMessage, TemplateRecipient

    template = TemplateMessage(draft_id=7, from_addr="Field Notes <d@example.org>", subject="Ünïcode \"digest\"",
                               html_parts=(pad + "<p>Hi ", ", " + pad + "<a href=\"",
                                           "\">unsubscribe</a> \u2014 é</p>"),
                               html_slots=("name", "unsubscribe_url"),
                               text_parts=("Hi ", "\nUnsubscribe: ", "\n"), text_slots=("name", "unsubscribe_url"),
                               reply_to="Reply <r@example.org>", tag="digest-7")
    provider = PostmarkProvider(Delivery(provider="postmark", api_key="t"))
    recipients, messages = [], []
    for i, name in enumerate(["Ann", "Bo &amp; \"Cy\"", "李"]):
        url = f"https://x.org/u/{i}"
        headers = list_headers(i + 1, url)
        recipients.append(TemplateRecipient(i + 1, f"r{i}@example.com", name,
                                            (name, url, url), (name, url, url), headers))
        messages.append(OutgoingMessage(i + 1, 7, f"r{i}@example.com", name, template.from_addr, template.subject,
                                        f"{pad}<p>Hi {name}, {pad}<a href=\"{url}\">unsubscribe</a> \u2014 é</p>",
                                        f"Hi {name}\nUnsubscribe: {url}\n", headers, template.reply_to, "", "digest-7"))
    call = provider.build_template_request(template, recipients)
    fast = _json.loads(call.body)
    plain = _json.loads(provider.build_request(messages).body)
    assert fast == plain
    assert bytes(BodyParts(provider._template_parts(template, recipients)[0])) == call.body


# -- Postmark's unsubscribe placeholder: readers get a quoted one as written -----------------

ZWSP = "\u200b"


def _bodies(item: dict[str, str]) -> tuple[str, str]:
    """A message's bodies as the reader sees them: the HTML's &#123; is a "{", and the text's
    zero-width spaces show as nothing."""
    return item["HtmlBody"].replace("&#123;", "{"), item["TextBody"].replace(ZWSP, "")


def test_a_quoted_unsubscribe_placeholder_is_sent_literally(
    provider: PostmarkProvider, make_message: MessageFactory
) -> None:
    comment = 'Postmark wants {{{ pm:unsubscribe }}} or {{{ pm:unsubscribe label="x" }}} in the footer.'
    msg = make_message(1, html=f"<p>{comment}</p>", text=comment)
    (item,) = json.loads(provider.build_request([msg]).body)
    # No two braces side by side: Postmark finds no placeholder to replace ...
    assert "{{" not in item["HtmlBody"] and "{{" not in item["TextBody"]
    assert item["HtmlBody"] == "<p>" + comment.replace("{{{", "&#123;&#123;{") + "</p>"
    # ... and the reader sees what the commenter wrote.
    assert _bodies(item) == (msg.html, msg.text)


def test_bodies_without_a_pair_of_braces_are_sent_as_they_are(
    provider: PostmarkProvider, make_message: MessageFactory
) -> None:
    text = "a { lone brace, closing ones }} and { {spaced} }"
    msg = make_message(1, html=f"<style>p {{ color: red }}</style><p>{text}</p>", text=text)
    (item,) = json.loads(provider.build_request([msg]).body)
    assert (item["HtmlBody"], item["TextBody"]) == (msg.html, msg.text)


@given(st.lists(st.text("{} a", max_size=6), min_size=3, max_size=3), st.text("{} b", max_size=5))
def test_template_path_leaves_no_placeholder_across_the_readers_values(parts: list[str], name: str) -> None:
    """The draft's parts (made literal once per draft) and a reader's name with braces, side
    by side in any way: no pair of braces reaches Postmark, and each reader sees the body
    the full-body path would have given them."""
    from digest.delivery.providers.base import expand_template
    from digest.types import TemplateMessage, TemplateRecipient

    template = TemplateMessage(draft_id=7, from_addr="Field Notes <d@example.org>", subject="s",
                               html_parts=tuple(parts), html_slots=("name", "unsubscribe_url"),
                               text_parts=tuple(parts), text_slots=("name", "name"))
    url = "https://x.org/u/1"
    recipient = TemplateRecipient(1, "r@example.com", "R", (name, url, url), (name, url, url), ())
    provider = PostmarkProvider(Delivery(provider="postmark", api_key="t"))
    (item,) = json.loads(provider.build_template_request(template, [recipient]).body)
    assert "{{" not in item["HtmlBody"] and "{{" not in item["TextBody"]
    expected = expand_template(template, recipient)
    assert _bodies(item) == (expected.html, expected.text)
