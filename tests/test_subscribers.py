from __future__ import annotations

import io

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from digest import subscribers
from digest.errors import SubscriberError, TokenError
from digest.store import Store
from tests.conftest import NOW


def test_add_normalizes_and_refuses_invalid(store: Store) -> None:
    sub = subscribers.add(store, "  Ann@Example.COM ", "Ann\r\nBcc: evil@x.org", NOW)
    assert sub.email == "ann@example.com"
    assert "\n" not in sub.name and "\r" not in sub.name
    with pytest.raises(SubscriberError, match="not-an-address"):
        subscribers.add(store, "not-an-address", "", NOW)


def test_import_reports_bad_lines_merges_duplicates_and_keeps_unsubscribed(store: Store) -> None:
    subscribers.add(store, "gone@example.com", "Gone", NOW)
    gone = store.subscriber_by_email("gone@example.com")
    assert gone is not None
    subscribers.unsubscribe(store, gone, NOW)
    csv_text = (
        "email,name\n"
        "ann@example.com,Ann\n"
        "not an email,Bad\n"
        "ANN@example.com,\n"
        "bo@example.org,Bo\n"
        "\n"
        "gone@example.com,Gone Again\n"
        "@missing.org,X\n"
    )
    report = subscribers.import_csv(store, io.StringIO(csv_text), NOW)
    assert report.added == 2
    assert report.duplicates == 1
    assert [line for line, _ in report.invalid] == [3, 8]
    assert report.kept_unsubscribed == ["gone@example.com"]
    statuses = {s.email: s.status for s in store.list_subscribers()}
    assert statuses == {"ann@example.com": "active", "bo@example.org": "active", "gone@example.com": "unsubscribed"}
    names = {s.email: s.name for s in store.list_subscribers()}
    assert names["ann@example.com"] == "Ann"


def test_import_without_header_and_with_reordered_header(store: Store) -> None:
    report = subscribers.import_csv(store, io.StringIO("a@example.com,A\nb@example.com\n"), NOW)
    assert report.added == 2 and not report.invalid
    report = subscribers.import_csv(store, io.StringIO("Name,Email\nC,c@example.com\n"), NOW)
    assert report.added == 1
    assert store.subscriber_by_email("c@example.com").name == "C"  # type: ignore[union-attr]


def test_reimport_never_resurrects(store: Store) -> None:
    subscribers.import_csv(store, io.StringIO("a@example.com,A\n"), NOW)
    sub = store.subscriber_by_email("a@example.com")
    assert sub is not None
    subscribers.unsubscribe(store, sub, NOW)
    report = subscribers.import_csv(store, io.StringIO("a@example.com,A\n"), NOW)
    assert report.added == 0 and report.kept_unsubscribed == ["a@example.com"]
    with pytest.raises(SubscriberError, match="unsubscribed and will not be re-added"):
        subscribers.add(store, "a@example.com", "", NOW)


def test_remove_then_add_again(store: Store) -> None:
    subscribers.add(store, "a@example.com", "A", NOW)
    assert subscribers.remove(store, "A@example.com", NOW)
    assert not subscribers.remove(store, "a@example.com", NOW)
    assert store.subscriber_by_email("a@example.com").status == "removed"  # type: ignore[union-attr]
    assert subscribers.add(store, "a@example.com", "A", NOW).status == "active"
    with pytest.raises(SubscriberError, match="not a subscriber"):
        subscribers.remove(store, "nobody@example.com", NOW)


@pytest.mark.parametrize("raw", [
    "zoe@xn--bcher-kva.example",  # as providers report it: the domain as it was sent
    "ZOE@XN--BCHER-KVA.EXAMPLE",
    "Zoe@BÜCHER.example",
    "zoe@bu\u0308cher.example",  # the ü decomposed (NFD)
    " zoe@bücher.example\n",
])
def test_canonical_email_is_the_stored_form(raw: str) -> None:
    assert subscribers.normalize_email("Zoe@Bücher.example") == "zoe@bücher.example"
    assert subscribers.canonical_email(raw) == "zoe@bücher.example"


@pytest.mark.parametrize(("raw", "expected"), [
    ("Not An Address", "not an address"), ("", ""), ("a@xn--zz", "a@xn--zz"), ("a@B..C", "a@b..c"),
    ("\ud800ada@example.com", "\ud800ada@example.com"), ("ada\x00@example.com", "ada\x00@example.com"),
])
def test_canonical_email_never_raises_and_keeps_what_is_no_address_lower_cased(raw: str, expected: str) -> None:
    assert subscribers.canonical_email(raw) == expected


_ASCII_PARTS = st.sampled_from([*"aZ09.-_+!#$%&*/=?^`{|}~\"(),:;<>[]\\ \t", "@", "xn--", "XN--", ".com", "ex."])


@settings(max_examples=300)
@given(st.one_of(st.emails(), st.lists(_ASCII_PARTS, max_size=30).map("".join)).map(
    lambda raw: raw.upper() if len(raw) % 2 else raw))
def test_canonical_email_takes_ascii_without_normalize_email_and_agrees_with_it(raw: str) -> None:
    try:
        expected = subscribers.normalize_email(raw)
    except SubscriberError:
        expected = raw.strip().lower()
    assert subscribers.canonical_email(raw) == expected


def test_remove_and_reactivate_find_an_idn_address_as_a_provider_shows_it(store: Store) -> None:
    subscribers.add(store, "zoe@bücher.example", "Zoë", NOW)
    subscribers.add(store, "yan@bücher.example", "Yan", NOW)
    store.suppress("zoe@bücher.example", "hard_bounce", "postmark", NOW)
    assert subscribers.reactivate(store, "Zoe@XN--BCHER-KVA.example", NOW).status == "bounced"
    assert store.subscriber_by_email("zoe@bücher.example").status == "active"  # type: ignore[union-attr]
    assert subscribers.remove(store, "yan@xn--bcher-kva.example", NOW)
    assert store.subscriber_by_email("yan@bücher.example").status == "removed"  # type: ignore[union-attr]


def test_export_round_trips(store: Store) -> None:
    subscribers.add(store, "a@example.com", "Ä, \"quoted\"", NOW)
    text = "".join(subscribers.export_csv(store.list_subscribers()))
    back = subscribers.read_csv(io.StringIO(text))[0]
    assert back == [(2, "a@example.com", "Ä, \"quoted\"")]


def test_tokens_are_purpose_bound_and_tamper_proof(store: Store) -> None:
    sub = subscribers.add(store, "a@example.com", "", NOW)
    token = subscribers.token_for("s3cret", subscribers.UNSUBSCRIBE, sub.id, sub.email)
    assert subscribers.subscriber_for_token(store, "s3cret", subscribers.UNSUBSCRIBE, token).id == sub.id
    with pytest.raises(TokenError):
        subscribers.subscriber_for_token(store, "s3cret", subscribers.PREFERENCES, token)
    with pytest.raises(TokenError):
        subscribers.subscriber_for_token(store, "other-secret", subscribers.UNSUBSCRIBE, token)
    with pytest.raises(TokenError):
        subscribers.subscriber_for_token(store, "s3cret", subscribers.UNSUBSCRIBE, token[:-2] + "xx")


def test_unsubscribe_is_idempotent_and_suppresses(store: Store) -> None:
    sub = subscribers.add(store, "a@example.com", "", NOW)
    assert subscribers.unsubscribe(store, sub, NOW)
    again = store.subscriber(sub.id)
    assert again is not None and again.status == "unsubscribed"
    assert not subscribers.unsubscribe(store, again, NOW)
