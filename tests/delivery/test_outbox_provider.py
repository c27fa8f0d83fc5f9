"""The outbox provider writes one parseable .eml per message, atomically."""

from __future__ import annotations

import email
import email.policy
from pathlib import Path

import pytest

from digest.config import Delivery
from digest.delivery.providers.outbox import OutboxProvider, eml_path, safe_local_part
from digest.errors import BlockedError, DeliveryError
from tests.delivery.conftest import MessageFactory


@pytest.fixture
def outbox(tmp_path: Path) -> OutboxProvider:
    return OutboxProvider(Delivery(provider="outbox", outbox_dir=str(tmp_path / "outbox")))


def test_writes_one_eml_per_message(
    outbox: OutboxProvider, make_message: MessageFactory, tmp_path: Path
) -> None:
    messages = [
        make_message(1),
        make_message(2, to_email="o'brien+digest@example.com", to_name="Zoë O'Brien"),
    ]
    results = outbox.send_batch(messages)
    assert [r.ledger_id for r in results] == [1, 2]
    assert [r.status for r in results] == ["sent", "sent"]
    folder = tmp_path / "outbox" / "7"
    assert sorted(p.name for p in folder.iterdir()) == ["1-reader1.eml", "2-o_brien+digest.eml"]
    for msg, result in zip(messages, results):
        path = eml_path(tmp_path / "outbox", msg)
        parsed = email.message_from_bytes(path.read_bytes(), policy=email.policy.default)
        assert parsed["Message-ID"] == result.provider_message_id
        assert parsed.get_content_type() == "multipart/alternative"
        assert parsed["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
        assert parsed["To"].addresses[0].display_name == msg.to_name
        text, html = parsed.iter_parts()
        assert text.get_content().replace("\r\n", "\n") == msg.text
        assert html.get_content().replace("\r\n", "\n").rstrip("\n") == msg.html


def test_files_use_crlf_and_leave_no_temporary_files(
    outbox: OutboxProvider, make_message: MessageFactory, tmp_path: Path
) -> None:
    outbox.send_batch([make_message(i) for i in range(1, 6)])
    files = list((tmp_path / "outbox").rglob("*"))
    assert not [f for f in files if f.name.startswith(".") or f.suffix == ".tmp"]
    data = (tmp_path / "outbox" / "7" / "1-reader1.eml").read_bytes()
    assert b"\r\n" in data and b"\n" not in data.replace(b"\r\n", b"")


def test_sending_a_row_again_replaces_its_file(
    outbox: OutboxProvider, make_message: MessageFactory, tmp_path: Path
) -> None:
    outbox.send_batch([make_message(1, subject="First")])
    outbox.send_batch([make_message(1, subject="Second")])
    (only,) = (tmp_path / "outbox" / "7").iterdir()
    assert (
        email.message_from_bytes(only.read_bytes(), policy=email.policy.default)["Subject"]
        == "Second"
    )


def test_message_id_is_kept_when_given(
    outbox: OutboxProvider, make_message: MessageFactory
) -> None:
    (result,) = outbox.send_batch([make_message(1, message_id="<fixed.1@news.example.org>")])
    assert result.provider_message_id == "<fixed.1@news.example.org>"


def test_invalid_address_is_a_result_not_an_error(
    outbox: OutboxProvider, make_message: MessageFactory, tmp_path: Path
) -> None:
    results = outbox.send_batch([make_message(1, to_email="not-an-address"), make_message(2)])
    assert [r.status for r in results] == ["invalid", "sent"]
    assert results[0].error and "not-an-address" in results[0].error
    assert [p.name for p in (tmp_path / "outbox" / "7").iterdir()] == ["2-reader2.eml"]
    # A dry run finds the same refusal, the same reason, and writes nothing.
    assert outbox.refusals([make_message(1, to_email="not-an-address"), make_message(3)]) == [results[0]]
    assert not (tmp_path / "outbox" / "7" / "3-reader3.eml").exists()


def test_a_bad_from_address_stops_the_batch(
    outbox: OutboxProvider, make_message: MessageFactory, tmp_path: Path
) -> None:
    """Not every reader ``invalid``: the configuration is wrong, and the sender puts the batch
    back in the queue for a BlockedError."""
    messages = [make_message(i, from_addr="Field Notes <digest@>") for i in (1, 2)]
    with pytest.raises(BlockedError) as info:
        outbox.send_batch(messages)
    assert str(info.value) == (
        "outbox: bad From address: not an email address: 'Field Notes <digest@>' "
        "(check newsletter.from)"
    )
    assert not (tmp_path / "outbox").exists()
    with pytest.raises(BlockedError, match="bad From address"):
        outbox.refusals(messages)  # the dry run's check


def test_a_bad_reply_to_address_stops_the_batch_too(
    outbox: OutboxProvider, make_message: MessageFactory, tmp_path: Path
) -> None:
    messages = [make_message(i, reply_to="replies@") for i in (1, 2)]
    with pytest.raises(BlockedError, match="bad Reply-To address") as info:
        outbox.send_batch(messages)
    assert info.value.hint == "check newsletter.reply_to"
    assert not (tmp_path / "outbox").exists()
    with pytest.raises(BlockedError, match="bad Reply-To address"):
        outbox.refusals(messages)


def test_unwritable_folder_fails_the_call(tmp_path: Path, make_message: MessageFactory) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    provider = OutboxProvider(Delivery(provider="outbox", outbox_dir=str(blocker)))
    with pytest.raises(DeliveryError) as info:
        provider.send_batch([make_message(1)])
    assert info.value.retryable
    with pytest.raises(DeliveryError, match="not writable"):
        provider.check()


def test_check_creates_the_folder(tmp_path: Path) -> None:
    provider = OutboxProvider(
        Delivery(provider="outbox", outbox_dir=str(tmp_path / "new" / "outbox"))
    )
    line = provider.check()
    assert line.startswith("outbox: writing .eml files to ")
    assert (tmp_path / "new" / "outbox").is_dir()
    assert list((tmp_path / "new" / "outbox").iterdir()) == []


def test_batch_limit(outbox: OutboxProvider, make_message: MessageFactory) -> None:
    assert OutboxProvider.max_batch == 500
    with pytest.raises(ValueError, match="limit is 500"):
        outbox.send_batch([make_message(i) for i in range(501)])


@pytest.mark.parametrize(
    ("address", "safe"),
    [
        ("ada@example.com", "ada"),
        ("first.last+tag@example.com", "first.last+tag"),
        ("../../etc/passwd@example.com", "etc_passwd"),
        ("ü@example.com", "recipient"),
        ("a/b\\c@example.com", "a_b_c"),
        ("x" * 100 + "@example.com", "x" * 64),
    ],
)
def test_safe_local_part(address: str, safe: str) -> None:
    assert safe_local_part(address) == safe
