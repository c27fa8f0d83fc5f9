"""Store.reactivate: an operator takes a reader back after a bounce, never after a complaint or
an unsubscribe. Run on SQLite and, with DIGEST_TEST_POSTGRES_URL, on PostgreSQL."""

from __future__ import annotations

import time
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import inspect, select

from digest import subscribers
from digest.errors import SubscriberError
from digest.store import Store, db
from digest.store.schema import suppressions
from digest.store.store import Reactivated, SuppressionRules
from digest.types import DeliveryEvent
from tests.conftest import NOW
from tests.store.test_store import _at_once, _sending

RULES = SuppressionRules({"hard_bounce": "hard_bounce", "complaint": "complaint", "unsubscribe": "unsubscribed"},
                         3, timedelta(days=30))
LATER = NOW + timedelta(days=2)


def event(event_id: str, event_type: str, email: str = "ada@x.org", provider: str = "sendgrid") -> DeliveryEvent:
    return DeliveryEvent(provider, event_id, event_type, email, NOW)


def webhook(store: Store, *events: DeliveryEvent, now: Any = NOW) -> tuple[str, ...]:
    """Apply one webhook request's events at ``now``; the addresses they suppressed."""
    return store.apply_webhook("sendgrid", list(events), now, RULES).suppressed


def status(store: Store, email: str = "ada@x.org") -> str:
    sub = store.subscriber_by_email(email)
    assert sub is not None
    return sub.status


def suppression(store: Store, email: str = "ada@x.org") -> str | None:
    with store.engine.connect() as conn:
        return conn.execute(select(suppressions.c.reason).where(suppressions.c.email == email)).scalar()


def test_a_hard_bounced_reader_taken_back_is_claimed_in_the_next_send(store: Store) -> None:
    draft_id = _sending(store, ["ada@x.org", "ben@x.org"])
    assert webhook(store, event("sg-1", "hard_bounce")) == ("ada@x.org",)
    assert status(store) == "bounced"
    done = store.reactivate(" Ada@X.org ", LATER)
    assert done == Reactivated("ada@x.org", "bounced", "hard_bounce", "sendgrid", NOW)
    sub = store.subscriber_by_email("ada@x.org")
    assert sub is not None and sub.status == "active" and sub.unsubscribed_at is None
    assert suppression(store) is None
    assert [s.email for s in store.audience()] == ["ada@x.org", "ben@x.org"]
    assert store.start_send(draft_id, LATER) == 2
    claimed = store.claim_batch(draft_id, 10, "t", LATER)
    assert sorted(c.recipient.email for c in claimed) == ["ada@x.org", "ben@x.org"]  # not skipped


@pytest.mark.parametrize("reason", ["soft_bounce_limit", "provider_suppressed"])
def test_the_other_bounces_are_taken_back_too(store: Store, reason: str) -> None:
    store.upsert_subscribers([("ada@x.org", "Ada")], "cli", NOW)
    store.suppress("ada@x.org", reason, "postmark", NOW)
    assert status(store) == "bounced"
    assert store.reactivate("ada@x.org", LATER, provider_cleared=True) == Reactivated(
        "ada@x.org", "bounced", reason, "postmark", NOW)
    assert status(store) == "active" and suppression(store) is None


def test_an_address_the_provider_refused_needs_the_operators_word_that_it_cleared_it(store: Store) -> None:
    store.upsert_subscribers([("ada@x.org", "Ada")], "cli", NOW)
    store.suppress("ada@x.org", "provider_suppressed", "postmark", NOW)
    with pytest.raises(SubscriberError, match="refused by postmark, whose list may hold it for a complaint") as caught:
        store.reactivate("ada@x.org", LATER)
    assert "--provider-cleared" in (caught.value.hint or "")
    assert status(store) == "bounced" and suppression(store) == "provider_suppressed"  # nothing written


@pytest.mark.parametrize(("event_type", "said_no"), [("complaint", "complained"), ("unsubscribe", "unsubscribed")])
def test_a_reader_who_complained_or_unsubscribed_is_refused_and_nothing_changes(store: Store, event_type: str,
                                                                               said_no: str) -> None:
    store.upsert_subscribers([("ada@x.org", "Ada")], "cli", NOW)
    webhook(store, event("sg-1", event_type))
    reason = suppression(store)
    with pytest.raises(SubscriberError, match=f"^ada@x.org is {said_no} and will not be reactivated "
                                              r"\(only the reader can subscribe again\)$"):
        store.reactivate("ada@x.org", LATER)
    assert status(store) == said_no and suppression(store) == reason
    assert [s.email for s in store.audience()] == []


def test_an_unsubscribe_by_link_is_refused(store: Store) -> None:
    sub = subscribers.add(store, "ada@x.org", "Ada", NOW)
    assert subscribers.unsubscribe(store, sub, NOW)
    with pytest.raises(SubscriberError, match="is unsubscribed and will not be reactivated"):
        store.reactivate("ada@x.org", LATER)
    assert status(store) == "unsubscribed"


def test_a_bounced_reader_who_then_unsubscribes_by_link_is_refused(store: Store) -> None:
    """The link in an earlier digest (or the mailbox's one-click button) still works while the
    address bounces: the reader's choice is recorded, and the operator cannot undo it."""
    subscribers.add(store, "ada@x.org", "Ada", NOW)
    webhook(store, event("sg-1", "hard_bounce"))
    sub = store.subscriber_by_email("ada@x.org")  # as the link's page finds the reader
    assert sub is not None and sub.status == "bounced"
    assert subscribers.unsubscribe(store, sub, NOW)
    assert status(store) == "unsubscribed"
    with pytest.raises(SubscriberError, match="is unsubscribed and will not be reactivated"):
        store.reactivate("ada@x.org", LATER)
    assert suppression(store) == "hard_bounce"  # the list keeps its first reason, and the address


@pytest.mark.parametrize(("event_type", "said_no"), [("complaint", "complained"), ("unsubscribe", "unsubscribed")])
def test_a_complaint_or_unsubscribe_received_after_the_bounce_is_refused(store: Store, event_type: str,
                                                                         said_no: str) -> None:
    """Suppressed for a bounce already, the address keeps that reason and status when the reader
    complains about an earlier digest: the stored event still says no."""
    store.upsert_subscribers([("ada@x.org", "Ada")], "cli", NOW)
    webhook(store, event("sg-1", "hard_bounce"))
    webhook(store, event("sg-2", event_type), now=NOW + timedelta(hours=1))
    assert status(store) == "bounced" and suppression(store) == "hard_bounce"
    with pytest.raises(SubscriberError, match=f"^ada@x.org bounced but {said_no} on 2026-11-26 and will not be "):
        store.reactivate("ada@x.org", LATER)
    assert status(store) == "bounced" and suppression(store) == "hard_bounce"


def test_unknown_active_and_removed_addresses_are_refused(store: Store) -> None:
    store.upsert_subscribers([("ada@x.org", "Ada"), ("ben@x.org", "Ben")], "cli", NOW)
    with pytest.raises(SubscriberError, match="^nobody@x.org is neither a subscriber nor suppressed"):
        store.reactivate("nobody@x.org", LATER)
    with pytest.raises(SubscriberError, match=r"^ada@x.org is active and not suppressed \(there is nothing"):
        store.reactivate("ada@x.org", LATER)
    ben = store.subscriber_by_email("ben@x.org")
    assert ben is not None and subscribers.remove(store, ben.email, NOW)
    with pytest.raises(SubscriberError, match=r"was removed .* \(`digest subscribers add` takes it back\)$"):
        store.reactivate("ben@x.org", LATER)
    webhook(store, event("sg-1", "hard_bounce", "ben@x.org"))  # a late bounce for a removed reader
    with pytest.raises(SubscriberError, match=r"takes it back, then reactivate it\)$"):
        store.reactivate("ben@x.org", LATER)
    assert status(store) == "active" and status(store, "ben@x.org") == "removed"
    assert suppression(store, "ben@x.org") == "hard_bounce"


def test_an_address_suppressed_before_it_subscribed_is_lifted(store: Store) -> None:
    webhook(store, event("sg-1", "hard_bounce", "new@x.org"))
    assert store.reactivate("new@x.org", LATER) == Reactivated("new@x.org", None, "hard_bounce", "sendgrid", NOW)
    assert suppression(store, "new@x.org") is None and store.subscriber_by_email("new@x.org") is None
    # It subscribed meanwhile: active, but suppressed; taken back, it is in the audience.
    webhook(store, event("sg-2", "hard_bounce", "late@x.org"))
    store.upsert_subscribers([("new@x.org", ""), ("late@x.org", "")], "cli", LATER)
    assert [s.email for s in store.audience()] == ["new@x.org"]
    assert store.reactivate("late@x.org", LATER).status == "active"
    assert sorted(s.email for s in store.audience()) == ["late@x.org", "new@x.org"]


def test_a_subscriber_bounced_without_a_suppression_is_taken_back(store: Store) -> None:
    store.upsert_subscribers([("ada@x.org", "Ada")], "cli", NOW)
    ada = store.subscriber_by_email("ada@x.org")
    assert ada is not None and store.set_subscriber_status(ada.id, "bounced", NOW)
    assert store.reactivate("ada@x.org", LATER) == Reactivated("ada@x.org", "bounced", None, "", NOW)
    assert [s.email for s in store.audience()] == ["ada@x.org"]


def test_soft_bounces_count_from_the_reactivation_on(store: Store) -> None:
    store.upsert_subscribers([("ada@x.org", "Ada")], "cli", NOW)
    soft = [event(f"soft-{i}", "soft_bounce") for i in range(6)]
    assert webhook(store, soft[0]) == webhook(store, soft[1]) == ()
    assert webhook(store, soft[2]) == ("ada@x.org",)
    assert store.reactivate("ada@x.org", NOW + timedelta(hours=1)).reason == "soft_bounce_limit"
    # The three before do not count, though within the window: two more keep the reader.
    assert webhook(store, soft[3], now=NOW + timedelta(hours=2)) == ()
    assert webhook(store, soft[4], now=NOW + timedelta(hours=3)) == ()
    assert status(store) == "active"
    assert webhook(store, soft[5], now=NOW + timedelta(hours=4)) == ("ada@x.org",)
    assert status(store) == "bounced" and suppression(store) == "soft_bounce_limit"


def test_a_bounce_after_the_reactivation_suppresses_again(store: Store) -> None:
    draft_id = _sending(store, ["ada@x.org", "ben@x.org"])
    webhook(store, event("sg-1", "hard_bounce"))
    store.reactivate("ada@x.org", LATER)
    assert webhook(store, event("sg-2", "hard_bounce"), now=LATER + timedelta(hours=1)) == ("ada@x.org",)
    assert status(store) == "bounced" and suppression(store) == "hard_bounce"
    store.start_send(draft_id, LATER)
    assert [c.recipient.email for c in store.claim_batch(draft_id, 10, "t", LATER)] == ["ben@x.org"]
    # Taken back a second time, a complaint since is what counts, not the first reactivation's past.
    assert store.reactivate("ada@x.org", LATER + timedelta(hours=2)).status == "bounced"
    assert status(store) == "active"


def test_a_complaint_being_applied_while_the_reader_is_reactivated_wins(store: Store) -> None:
    """The complaint's request has stored its event and applied it (nothing to change: the
    address is suppressed for a bounce already) but not committed when the reactivation starts:
    the reactivation waits for it, sees the complaint and refuses."""
    other = Store(db.make_engine(store.engine.url.render_as_string(hide_password=False)))
    try:
        store.upsert_subscribers([("ada@x.org", "Ada")], "cli", NOW)
        webhook(store, event("sg-1", "hard_bounce"))
        real = other._apply_events

        def slow(*args: Any, **kwargs: Any) -> Any:
            out = real(*args, **kwargs)
            time.sleep(0.5)  # applied, not committed yet
            return out

        other._apply_events = slow  # type: ignore[method-assign]

        def work(s: Store, first: bool) -> Any:
            if first:
                time.sleep(0.2)  # while the complaint's transaction is open
                try:
                    return s.reactivate("ada@x.org", LATER)
                except SubscriberError as exc:
                    return str(exc)
            return webhook(s, event("sg-2", "complaint"), now=NOW + timedelta(hours=1))

        refused, _ = _at_once(0, store, other, work)
        assert refused == ("ada@x.org bounced but complained on 2026-11-26 and will not be reactivated "
                           "(only the reader can subscribe again)")
        assert status(store) == "bounced" and suppression(store) == "hard_bounce"
    finally:
        other.close()


def test_a_bounce_arriving_during_a_reactivation_is_applied_after_it(store: Store,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    other = Store(db.make_engine(store.engine.url.render_as_string(hide_password=False)))
    try:
        store.upsert_subscribers([("ada@x.org", "Ada")], "cli", NOW)
        webhook(store, event("sg-1", "hard_bounce"))
        real = Store._refuse_reactivation

        def slow(*args: Any) -> None:
            real(*args)
            time.sleep(0.5)  # lifted, not committed yet

        monkeypatch.setattr(store, "_refuse_reactivation", slow)

        def work(s: Store, first: bool) -> Any:
            if first:
                return s.reactivate("ada@x.org", LATER)
            time.sleep(0.2)
            return webhook(s, event("sg-2", "hard_bounce"), now=LATER)

        done, suppressed = _at_once(0, store, other, work)
        assert done.status == "bounced" and suppressed == ("ada@x.org",)
        assert status(store) == "bounced" and suppression(store) == "hard_bounce"
    finally:
        other.close()


def test_upgrade_to_0010_adds_the_reactivations_and_downgrade_drops_them(db_url: str) -> None:
    from alembic import command

    engine = db.make_engine(db_url)
    db.upgrade(engine, "0009")
    assert "reactivations" not in inspect(engine).get_table_names()
    assert db.upgrade(engine, "0010") == ("0009", "0010")
    assert "reactivations" in inspect(engine).get_table_names()
    with engine.begin() as conn:
        cfg = db._alembic_config(engine)
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, "0009")
    assert "reactivations" not in inspect(engine).get_table_names()
    engine.dispose()
