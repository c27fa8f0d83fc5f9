"""The outbox: each message becomes an ``.eml`` file instead of an email. The embedded default.

Layout: ``<outbox_dir>/<draft_id>/<ledger_id>-<local-part>.eml``, one standards-correct
message per file (see :mod:`digest.delivery.mime`); open one in any mail client. A file is
written to a temporary name and renamed into place, so a reader never sees half a message, and
sending the same ledger row again replaces its file instead of adding one.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar

import requests

from digest import clock
from digest.config import Delivery
from digest.delivery.mime import as_bytes
from digest.delivery.providers.base import MimeProvider
from digest.errors import DeliveryError
from digest.types import OutgoingMessage, SendResult

_UNSAFE_RE = re.compile(r"[^A-Za-z0-9._+-]+")
_HINT = "check that delivery.outbox_dir is a writable folder"


def safe_local_part(address: str, limit: int = 64) -> str:
    """The address's local part reduced to characters safe in any file name."""
    local = address.rpartition("@")[0] or address
    safe = _UNSAFE_RE.sub("_", local).strip("._")[:limit]
    return safe or "recipient"


def eml_path(root: Path, msg: OutgoingMessage) -> Path:
    """Where the outbox writes ``msg``."""
    return root / str(msg.draft_id) / f"{msg.ledger_id}-{safe_local_part(msg.to_email)}.eml"


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and a rename."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


class OutboxProvider(MimeProvider):
    """Writes ``.eml`` files into ``delivery.outbox_dir``; every written message is ``sent``.

    ``outbox_dir`` is used as given: a relative path is relative to the working folder, so the
    caller resolves it against the config file first (``Settings.resolve``).
    """

    name: ClassVar[str] = "outbox"
    max_batch: ClassVar[int] = 500

    def __init__(self, settings: Delivery, session: requests.Session | None = None) -> None:
        super().__init__(settings, session)
        self.root = Path(settings.outbox_dir).expanduser()

    def send_batch(self, messages: Sequence[OutgoingMessage]) -> list[SendResult]:
        """Write one file per message. A message no header can carry is ``invalid``; a From
        address that cannot be used raises :class:`~digest.errors.BlockedError` instead of
        writing anything for it (both from :meth:`build_mime_message`, as in a dry run).

        A disk error fails the whole call (retryable): rewriting a file is harmless because
        its name depends only on the draft and the ledger row.
        """
        self._check_batch(messages)
        now = clock.now()
        results: list[SendResult] = []
        for msg in messages:
            built = self.build_mime_message(msg, now)
            if isinstance(built, SendResult):
                results.append(built)
                continue
            mime = built.mime
            path = eml_path(self.root, msg)
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                write_atomic(path, as_bytes(mime))
            except OSError as exc:
                raise DeliveryError(
                    f"outbox: cannot write {path}: {exc.strerror or exc}",
                    retryable=True,
                    hint=_HINT,
                ) from exc
            results.append(
                SendResult(
                    ledger_id=msg.ledger_id,
                    status="sent",
                    provider_message_id=str(mime["Message-ID"]),
                )
            )
        return results

    def check(self) -> str:
        """Create the folder if needed and prove it is writable with a throwaway file."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            fd, probe = tempfile.mkstemp(dir=self.root, prefix=".check-", suffix=".tmp")
            os.close(fd)
            os.unlink(probe)
        except OSError as exc:
            raise DeliveryError(
                f"outbox: {self.root} is not writable: {exc.strerror or exc}", hint=_HINT
            ) from exc
        return f"outbox: writing .eml files to {self.root.resolve()}"
