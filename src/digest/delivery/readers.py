"""A template batch's readers, as claimed, and what the providers write for each of them.

Providers that personalize server-side (Postmark templates, SendGrid, Mailgun) get a batch's
readers as :class:`Readers`: the claimed rows and the function that signs their links. Each
provider writes its request either way:

* with the C module ``digest._speedups`` (built at install, see ``hatch_build.py``), it hands
  :meth:`Readers.fill` a *program*: its per-reader JSON as a tuple of steps, each one bytes
  written as they are, a field code from this module (:data:`LEDGER`, :data:`TO` ...), or
  ``(before, code, after)``, written only when the field is not empty. The C code signs the
  links and writes each reader's bytes: well under a microsecond a reader, against about ten
  in Python. It does so for *plain* readers only (an address of ASCII letters, digits and
  ``. _ + -``; a name of ASCII letters, digits, spaces, ``_`` and ``-``), whose values no
  escaping changes, and leaves the others (``None``) to the provider's Python code;
* without it, every reader goes through that Python code, as a :class:`TemplateRecipient`.

Both ways write the same bytes: tests/delivery/test_speedups.py builds every provider's
request both ways, over plain readers and hostile ones, and compares them.
"""

from __future__ import annotations

import importlib
import re
from bisect import bisect_right
from collections.abc import Iterator, Sequence
from itertools import accumulate
from typing import TYPE_CHECKING, Any, Protocol, overload

from digest.render import slot_values
from digest.render.fill import NAME_FALLBACK, NAME_MAX
from digest.types import SLOT_NAMES, TemplateRecipient

if TYPE_CHECKING:
    from digest.store.store import Claimed

_speedups: Any
try:
    _speedups = importlib.import_module("digest._speedups")
except ImportError:  # not built (no C compiler at install): the Python path does it all
    _speedups = None

#: The fields a program may write (the C module's own numbering, checked on import).
LEDGER, EMAIL, NAME, RAW_NAME, TO, UNSUBSCRIBE, PREFERENCES = range(7)
if _speedups is not None and (_speedups.LEDGER, _speedups.EMAIL, _speedups.NAME, _speedups.RAW_NAME, _speedups.TO,
                              _speedups.UNSUBSCRIBE, _speedups.PREFERENCES) != tuple(range(7)):
    _speedups = None  # a module built from other sources (a stale build): not to be trusted

#: The field that holds each slot's value, in ``SLOT_NAMES`` order.
SLOT_FIELDS: tuple[int, ...] = tuple({"name": NAME, "unsubscribe_url": UNSUBSCRIBE,
                                      "preferences_url": PREFERENCES}[slot] for slot in SLOT_NAMES)

# A link prefix the C code may copy as it is: http(s), as the Python path requires, and
# nothing in it that HTML, JSON, a header or a provider's variable syntax would change.
_PLAIN_PREFIX = re.compile(r"https?://[A-Za-z0-9:/._~-]+")

# Characters a reader's name may hold without any escaping changing it (see odd_names): the
# C code's rule for a plain name.
_ODD_NAME = re.compile(r"[^A-Za-z0-9 _-]")

Step = bytes | int | tuple[bytes, int, bytes]

_ONE_CLICK = ("List-Unsubscribe-Post", "List-Unsubscribe=One-Click")


def list_headers(ledger_id: int, unsubscribe_url: str) -> tuple[tuple[str, str], ...]:
    """RFC 8058 one-click unsubscribe, and the ledger id for tracing a message back."""
    return (("List-Unsubscribe", f"<{unsubscribe_url}>"), _ONE_CLICK, ("X-Digest-Ledger-Id", str(ledger_id)))


#: The headers :func:`list_headers` gives every reader, with the one value they all get: a
#: provider whose request holds headers for the whole batch can write these once.
BATCH_HEADERS: dict[str, str] = dict([_ONE_CLICK])

#: :func:`list_headers` as program steps: each header's name and the steps of its value.
HEADER_STEPS: tuple[tuple[str, tuple[Step, ...]], ...] = (
    ("List-Unsubscribe", (b"<", UNSUBSCRIBE, b">")),
    (_ONE_CLICK[0], (_ONE_CLICK[1].encode(),)),
    ("X-Digest-Ledger-Id", (LEDGER,)),
)


class LinkMaker(Protocol):
    """Builds a subscriber's signed links: ``(unsubscribe URL, preferences URL)``."""

    def __call__(self, subscriber_id: int, email: str, /) -> tuple[str, str]: ...


def template_recipients(claimed: Sequence[Claimed], links: LinkMaker) -> list[TemplateRecipient]:
    """Each recipient's slot values (escaped exactly as :func:`~digest.render.personalize`
    would) and headers (as :func:`list_headers`). No Message-ID: providers that take templates
    assign their own.

    One loop with the row unpacked, not a call per recipient: this runs for every message.
    """
    out: list[TemplateRecipient] = []
    append = out.append
    for ledger_id, subscriber_id, email, name in claimed:
        unsubscribe_url, preferences_url = links(subscriber_id, email)
        html_values, text_values = slot_values(name=name, unsubscribe_url=unsubscribe_url,
                                               preferences_url=preferences_url)
        headers = (("List-Unsubscribe", f"<{unsubscribe_url}>"), _ONE_CLICK, ("X-Digest-Ledger-Id", str(ledger_id)))
        append(TemplateRecipient(ledger_id, email, name, html_values, text_values, headers))
    return out


def odd_names(names: Sequence[str]) -> list[int]:
    """The indexes of the ``names`` holding anything but ASCII letters, digits, spaces, ``_``
    and ``-``: the readers whose values an escaping may change (see :meth:`Readers.odd`). One
    scan of the names joined, not one per name."""
    joined = "".join(names)
    found = _ODD_NAME.search(joined)
    if found is None:
        return []
    ends = list(accumulate(map(len, names)))
    odd: list[int] = []
    while found is not None:
        index = bisect_right(ends, found.start())
        odd.append(index)
        found = _ODD_NAME.search(joined, ends[index])
    return odd


class Readers(Sequence[TemplateRecipient]):
    """A claimed batch's readers for a provider that personalizes server-side.

    As a sequence it holds their :class:`TemplateRecipient`, made when first asked for (the
    Python path). :meth:`fill` is the C path; :meth:`recipient` makes one reader's
    :class:`TemplateRecipient`, for a reader :meth:`fill` left to Python.
    """

    def __init__(self, rows: Sequence[Claimed], links: LinkMaker) -> None:
        self.rows = rows
        self.links = links
        self._all: list[TemplateRecipient] | None = None

    def recipients(self) -> list[TemplateRecipient]:
        if self._all is None:
            self._all = template_recipients(self.rows, self.links)
        return self._all

    def recipient(self, index: int) -> TemplateRecipient:
        if self._all is not None:
            return self._all[index]
        return template_recipients(self.rows[index:index + 1], self.links)[0]

    def in_c(self) -> bool:
        """Whether :meth:`fill` writes this batch's plain readers: the C module is there, the
        links are signed by a :class:`~digest.tokens.LinkUrls` (whose key the C code needs),
        and their prefixes (the public URL) hold nothing that some escaping would change."""
        from digest.tokens import LinkUrls

        links = self.links
        if _speedups is None or not isinstance(links, LinkUrls):
            return False
        plain = _PLAIN_PREFIX.fullmatch
        return bool(plain(links.unsubscribe_prefix) and plain(links.preferences_prefix))

    def odd(self) -> dict[int, TemplateRecipient]:
        """The readers whose name holds anything but ASCII letters, digits, spaces, ``_`` and
        ``-`` (:func:`odd_names`), made in Python, by index.

        For a batch :meth:`in_c`, these are the only readers whose values an escaping may
        change: every other reader's slot values are the same for HTML and text and hold
        nothing JSON, a header or a provider's variable syntax would change (their name is cut
        and trimmed, never escaped; their links are a plain prefix and a token of letters,
        digits, ``.``, ``_`` and ``-``). So what a provider decides from the escaped values
        (which slots one key serves for both parts) can be decided from these alone, before
        :meth:`fill` writes the others. Every such name is one the C code leaves to Python too.
        """
        return {index: self.recipient(index) for index in odd_names([row[3] for row in self.rows])}

    def fill(self, *programs: tuple[Step, ...]) -> tuple[list[bytes | None], ...] | None:
        """One list per program, with each reader's bytes, or ``None`` for a reader left to
        Python; ``None`` when the batch cannot be written in C at all (see :meth:`in_c`)."""
        if not self.in_c():
            return None
        links: Any = self.links
        filled: tuple[list[bytes | None], ...] = _speedups.fill(
            self.rows, programs, links.key, links.unsubscribe_prefix.encode(),
            links.preferences_prefix.encode(), NAME_FALLBACK.encode(), NAME_MAX)
        return filled

    def __len__(self) -> int:
        return len(self.rows)

    @overload
    def __getitem__(self, index: int) -> TemplateRecipient: ...

    @overload
    def __getitem__(self, index: slice) -> Sequence[TemplateRecipient]: ...

    def __getitem__(self, index: int | slice) -> TemplateRecipient | Sequence[TemplateRecipient]:
        return self.recipients()[index]

    def __iter__(self) -> Iterator[TemplateRecipient]:
        return iter(self.recipients())


def ledger_ids(recipients: Sequence[TemplateRecipient]) -> tuple[int, ...]:
    """The batch's ledger ids in order, without making a :class:`Readers`' recipients."""
    if isinstance(recipients, Readers):
        return tuple([row[0] for row in recipients.rows])
    return tuple([r.ledger_id for r in recipients])


def speedups_built() -> bool:
    """Whether the C module is there (``digest check`` and the tests say so)."""
    return _speedups is not None


__all__ = ["BATCH_HEADERS", "EMAIL", "HEADER_STEPS", "LEDGER", "NAME", "PREFERENCES", "RAW_NAME", "SLOT_FIELDS", "TO",
           "UNSUBSCRIBE", "LinkMaker", "Readers", "Step", "ledger_ids", "list_headers", "odd_names", "speedups_built",
           "template_recipients"]
