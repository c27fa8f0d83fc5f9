"""Postmark with server-side personalization: one server template per draft, a batch of 500
small messages through ``POST /email/batchWithTemplates``.

Opt-in (``delivery.postmark_templates``, while ``server_side_personalization`` is on): the
send creates a template in the operator's Postmark server and deletes it when the draft's send
has finished. Without it, Postmark gets a full body per reader (:mod:`.postmark`).

What Postmark's API does here, and where each fact comes from (checked Dec 2026):

* ``POST /templates`` with ``{Name, Alias, Subject, HtmlBody, TextBody, TemplateType}``
  creates a template; ``GET /templates/{idOrAlias}`` reads it and ``DELETE
  /templates/{idOrAlias}`` deletes it. An alias holds letters, digits, ``.``, ``-`` and ``_``
  and starts with a letter. [postmarkapp.com/developer/api/templates-api; the Rust ``postmark``
  crate's ``CreateTemplateRequest`` (docs.rs), which sends ``TemplateType: Standard``]
* A server holds a limited number of templates (the page says 100 in one version, 300
  active in another): one reason this is opt-in, and why the template is deleted after the send.
* ``POST /email/batchWithTemplates`` takes ``{"Messages": [...]}``, each message with
  ``TemplateAlias`` (or ``TemplateId``) and ``TemplateModel`` beside the usual ``From``,
  ``To``, ``Tag``, ``Metadata``, ``Headers``, ``ReplyTo``, ``MessageStream``.
  [the official Node client's ``sendEmailBatchWithTemplates`` posts ``{Messages}`` there
  (npm ``postmark`` 1.6.0); shared/reference/APIS.md A.1 from anymail; the templates-api page
  for the message fields of ``/email/withTemplate``, which we take to hold for each message
  of the batch]
* ``InlineCss`` (default true) makes Postmark move the template's ``<style>`` blocks into
  inline attributes; we send ``false``, so a reader gets the HTML we rendered, byte for byte.
  [templates-api page, "Send email with template"]
* The answer is one ``{ErrorCode, Message, MessageID, To}`` per message, in request order,
  as for ``/email/batch``. [anymail reads both endpoints' answers with the same code
  (APIS.md A.1); not checked on Postmark's own page: an answer of another length or shape is
  an uncertain batch, as for ``/email/batch``]
* Templates are Mustachio. Its tokenizer finds tags with the pattern ``{{`` + one or more
  characters other than braces + ``}}``, or the same with three braces; ``{{{x}}}`` and
  ``{{&x}}`` insert a value as it is, ``{{x}}`` escapes it for HTML, ``{{!...}}`` is a
  comment, ``{{#``, ``{{^``, ``{{/`` open and close sections; everything else is content, and
  values are not read as a template again. [ActiveCampaign/mustachio, Mustachio/Tokenizer.cs;
  postmarkapp.com/support/article/1077-template-syntax]
* Not found documented: the ErrorCode of a create whose alias is taken (so any refused create
  is followed by a read of the alias), and the per-message error of a batch naming a template
  that is gone (so a batch refused whole with a message about the template stops the send).

**Injection.** The draft's static parts hold essay and comment text, and the Subject too:
none of it may be read as Mustachio. Every ``{{`` in them becomes ``{{{o}}}``, a raw
reference to the model value ``"o": "{{"`` that every message then carries (a draft
without ``{{`` anywhere needs no ``"o"``, and its messages carry none). Then no tag can start
in static text: a tag needs two adjacent opening braces, and after the replacement every pair
of them in static text begins our own ``{{{o}}}`` (a lone ``{`` left over from an odd run sits
right after one, and before a slot's ``{{{`` it cannot begin a tag, since two or three braces
must be followed by a character that is not a brace). ``}}`` alone opens nothing. So
``{{x}}``, ``{{{x}}}``, ``{{#x}}``, ``{{/x}}``, ``{{!x}}``, ``{{>x}}`` in a comment all reach
the reader as written (tests/delivery/test_postmark_templates.py).

**Cleanup.** The sender records each alias in its own database before the template is made
(:meth:`PostmarkTemplateProvider.template_names`). When the draft's send has finished,
:meth:`PostmarkTemplateProvider.template_done` deletes the draft's template and every other
alias recorded for the draft: those made under an earlier alias (the content hash changed
mid-send, after an upgrade of digest or a change of ``newsletter.public_url``) and those an
earlier delete failed to remove. Why recorded rather than listed from the server: aliases
name the draft by its id, which another digest sending through the same Postmark server
(staging beside production, a second newsletter) has too, so only this database knows which
templates are its own. A failed delete stops none of the others; one error at the end names
what is left to remove by hand, and the sender logs it: the send stands.

The slots are ``{{{h0}}}``... in the HTML and ``{{{t0}}}``... in the text (``h``/``t`` and the
slot's index in ``SLOT_NAMES``): raw, because :func:`~digest.render.slot_values` already
escaped each value for its part, exactly as a full body would have it. A slot in
``TemplateMessage.plain_slots`` (the signed links, whose HTML value is their text for every
reader) is ``{{{h1}}}`` in the text too: one value in the model for both parts, about 130 bytes
less per message. A reader for whom the two differ after all is refused, never sent wrong.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any, ClassVar, NamedTuple

import requests

from digest.config import Delivery
from digest.delivery.mime import clean_header_value
from digest.delivery.providers.base import (
    PreparedCall,
    json_escape,
    json_string,
    response_text,
)
from digest.delivery.providers.postmark import (
    HeaderPrefixes,
    MessageEnd,
    PostmarkProvider,
    _Addressed,
    reader_to,
)
from digest.delivery.readers import LEDGER, SLOT_FIELDS, TO, Readers, Step, ledger_ids
from digest.errors import AuthError, BlockedError, DeliveryError
from digest.types import SLOT_NAMES, SendResult, TemplateMessage, TemplateRecipient

log = logging.getLogger(__name__)

OPEN_KEY = "o"  # the model value "{{", for the static text's own "{{" (carried where there is one)
_NEUTRAL = "{{{" + OPEN_KEY + "}}}"
_HINT = ("delivery.postmark_templates needs a server token that may manage templates and room for "
         "one more template in the Postmark server; or set delivery.postmark_templates: false")


def neutralize(text: str) -> str:
    """``text`` as Mustachio content that renders to ``text``: each ``{{`` a raw reference to
    the model's ``"o": "{{"`` (see the module docstring)."""
    return text.replace("{{", _NEUTRAL) if "{{" in text else text


def _key(kind: str, slot: str, plain: frozenset[str] = frozenset()) -> str:
    """A slot's model key: ``h`` or ``t`` and its index; a plain slot's text is its HTML value."""
    return f"{'h' if slot in plain else kind}{SLOT_NAMES.index(slot)}"


def mustachio(parts: Sequence[str], slots: Sequence[str], kind: str, plain: frozenset[str] = frozenset()) -> str:
    """A body's template: the static parts neutralized, each slot a raw ``{{{h0}}}`` reference."""
    out = [neutralize(parts[0])]
    for slot, part in zip(slots, parts[1:]):
        out += ("{{{", _key(kind, slot, plain), "}}}", neutralize(part))
    return "".join(out)


class ServerTemplate(NamedTuple):
    """The Postmark template for one draft and compiled content."""

    alias: str
    body: dict[str, str]  # the POST /templates request
    keys: tuple[tuple[str, bool, int], ...]  # model keys: (name, from the HTML values?, index)
    opens: bool  # whether the static text held "{{", so that the model carries "o"
    plain: tuple[int, ...]  # the indexes of the slots whose text is their HTML value


def server_template(template: TemplateMessage) -> ServerTemplate:
    """The template to create for ``template``: its alias names the draft and a hash of the
    content, so a changed draft never meets an old template. Pure."""
    plain = template.plain_slots
    subject = neutralize(clean_header_value(template.subject))
    html = mustachio(template.html_parts, template.html_slots, "h", plain)
    text = mustachio(template.text_parts, template.text_slots, "t", plain)
    digest = hashlib.sha256(json.dumps([subject, html, text]).encode()).hexdigest()[:12]
    alias = f"digest-{template.draft_id}-{digest}"
    keys: dict[str, tuple[str, bool, int]] = {}
    for kind, slots in (("h", template.html_slots), ("t", template.text_slots)):
        for slot in slots:
            key = _key(kind, slot, plain)
            keys.setdefault(key, (key, key[0] == "h", SLOT_NAMES.index(slot)))
    body = {"Name": f"digest draft {template.draft_id} ({digest})", "Alias": alias, "Subject": subject,
            "HtmlBody": html, "TextBody": text, "TemplateType": "Standard"}
    # Only our own references to "o" can be in the templates as {{{o}}}: a "{{" of the
    # content's own became one, and slot references name other keys.
    opens = _NEUTRAL in subject or _NEUTRAL in html or _NEUTRAL in text
    return ServerTemplate(alias, body, tuple(keys.values()), opens,
                          tuple(sorted(SLOT_NAMES.index(slot) for slot in plain)))


class _Skeleton(NamedTuple):
    """A message's shared JSON for one template, encoded once (see ``_prepared``)."""

    lead: bytes  # '{"From":..,"To":"', before the reader's address
    model: bytes  # from the end of To to the model's last shared value ('"o":"{{"')
    keys: tuple[tuple[bytes, bool, int], ...]  # (the JSON before a value, HTML value?, its index)
    meta: bytes  # after the last value, up to the ledger id
    end: MessageEnd  # after the ledger id


class PostmarkTemplateProvider(PostmarkProvider):
    """Postmark through a server template per draft; see the module docstring."""

    personalizes: ClassVar[bool] = True

    def __init__(self, settings: Delivery, session: requests.Session | None = None) -> None:
        super().__init__(settings, session)
        self.templates_url = f"{self.base_url}/templates"
        self.batch_templates_url = f"{self.base_url}/email/batchWithTemplates"
        self._made: set[str] = set()  # aliases known to exist in the Postmark server
        self._made_lock = threading.Lock()  # one creation at a time; the others wait for it
        self._server_cache: tuple[TemplateMessage, ServerTemplate, _Skeleton] | None = None

    # -- the template ---------------------------------------------------------------------------

    def _prepared(self, template: TemplateMessage) -> tuple[ServerTemplate, _Skeleton]:
        """The draft's template and every byte of a message that all readers share, made once
        per draft."""
        cached = self._server_cache
        if cached is not None and cached[0] is template:
            return cached[1], cached[2]
        made = server_template(template)
        # The model: "o" first where the static text needs it, then one value per key.
        opening = b'"' + OPEN_KEY.encode() + b'":"{{"' if made.opens else b""
        keys = tuple(((b'","' if i else b',"' if made.opens else b'"') + name.encode() + b'":"', is_html, index)
                     for i, (name, is_html, index) in enumerate(made.keys))
        meta = (b'"}' if keys else b"}") + b',"MessageStream":' + self._stream
        if template.tag:
            meta += b',"Tag":' + json_string(clean_header_value(template.tag))
        meta += b',"Metadata":{"ledger_id":"'
        skeleton = _Skeleton(
            lead=b'{"From":' + json_string(self._header_text("from", template.from_addr)) + b',"To":"',
            model=(b'","TemplateAlias":' + json_string(made.alias)
                   + b',"InlineCss":false,"TemplateModel":{' + opening),
            keys=keys,
            meta=meta,
            end=self._message_end(template),
        )
        self._server_cache = (template, made, skeleton)
        return made, skeleton

    def ensure_template(self, template: TemplateMessage) -> str:
        """Make sure the draft's template exists in the Postmark server; return its alias.

        Idempotent, and safe with other processes doing the same: a create that Postmark
        refuses (a resumed send, another sender process, a retry after a timeout: the alias is
        taken) is followed by a read of the alias, and an existing template is used. The alias
        holds a hash of the content, so what exists under it is this content.
        """
        made, _skeleton = self._prepared(template)
        with self._made_lock:
            if made.alias not in self._made:
                self._create(made)
                self._made.add(made.alias)
        return made.alias

    def _create(self, made: ServerTemplate) -> None:
        what = f"postmark: creating template {made.alias}"
        # A lone surrogate (from a feed's "\ud800") becomes "?", as in every other request body.
        body = json.dumps(made.body, ensure_ascii=False).encode("utf-8", "replace")
        status, headers, reply = self.request("POST", self.templates_url, self._post_headers, body)
        if 200 <= status < 300:
            log.info("postmark: created template %s", made.alias)
            return
        if status in (401, 403):
            raise AuthError(f"{what}: HTTP {status}: the server token was refused", status=status,
                            response_text=response_text(reply),
                            hint="check delivery.api_key: it must be the Postmark server token")
        if status == 429 or status >= 500:
            # Creating a template sends no mail: a 502 or 504 here is a plain retryable error
            # (a create that went through is found by the next try's read of the alias).
            self.raise_for_common_status(status, {k.lower(): v for k, v in headers.items()}, reply,
                                         sends_mail=False)
        if status == 404:  # no templates endpoint there: a wrong delivery.base_url
            raise self.status_error(status, reply, "creating a template")
        if status == 422 and self._exists(made.alias):
            return  # created by another sender, or by a call of ours whose answer was lost
        code, text = _error_of(reply)
        if code == 10:
            raise AuthError(f"{what}: ErrorCode 10: {text}", status=status, response_text=response_text(reply),
                            hint="check delivery.api_key: it must be the Postmark server token")
        detail = f"ErrorCode {code}: {text}" if code is not None else f"HTTP {status}"
        raise BlockedError(f"{what}: {detail}", status=status, response_text=response_text(reply), hint=_HINT)

    def _exists(self, alias: str) -> bool:
        status, headers, reply = self.request("GET", f"{self.templates_url}/{alias}", self._read_headers)
        if status == 429 or status >= 500:  # no answer to the question: try the batch again later
            self.raise_for_common_status(status, {k.lower(): v for k, v in headers.items()}, reply,
                                         sends_mail=False)
        if status == 200:
            try:
                data = json.loads(reply)
            except ValueError:
                return False
            return isinstance(data, dict) and data.get("Alias") in (None, alias)
        return False

    def template_ready(self, template: TemplateMessage) -> None:
        """The draft's template, made before the first batch is claimed (see the base class)."""
        self.ensure_template(template)

    def template_names(self, template: TemplateMessage) -> tuple[str, ...]:
        """The alias of the draft's template, for the sender to record before it is made
        (from the content alone: a bad ``newsletter.from`` is the first batch's to report)."""
        return (server_template(template).alias,)

    def template_done(self, template: TemplateMessage, earlier: Sequence[str] = ()) -> None:
        """The draft's send has finished: ``DELETE /templates/{alias}`` for its template, then
        for each alias in ``earlier`` (what the sender recorded for the draft; see the module
        docstring). A template already gone (another process deleted it) is fine. A failed
        delete stops none of the others: one :class:`DeliveryError` at the end names what is
        left to remove by hand, for the sender to log."""
        failed: list[tuple[str, DeliveryError]] = []
        for alias in dict.fromkeys((server_template(template).alias, *earlier)):
            error = self._delete(alias)
            if error is not None:
                failed.append((alias, error))
        if failed:
            raise _cleanup_error(failed)

    def _delete(self, alias: str) -> DeliveryError | None:
        """``DELETE /templates/{alias}``; the error if the template may still be there."""
        with self._made_lock:
            self._made.discard(alias)
        try:
            status, _headers, reply = self.request("DELETE", f"{self.templates_url}/{alias}", self._read_headers)
        except DeliveryError as exc:  # no answer (the transport's error names the URL)
            return exc
        if 200 <= status < 300 or status == 404:
            log.info("postmark: deleted template %s", alias)
            return None
        code, text = _error_of(reply)
        if status == 422 and "not found" in text.lower():
            return None  # the documented 404 may come as a 422 with an ErrorCode, like most errors
        return DeliveryError(f"postmark: deleting template {alias}: HTTP {status}"
                             + (f", ErrorCode {code}: {text}" if code is not None else ""),
                             status=status, response_text=response_text(reply))

    def check(self) -> str:
        """As for full bodies, saying that sends will create a template in the server."""
        return (f"{super().check()}; server templates on: a send creates one per draft "
                "(delivery.postmark_templates)")

    # -- the batch ------------------------------------------------------------------------------

    def _messages(self, template: TemplateMessage, recipients: Sequence[TemplateRecipient]
                  ) -> tuple[list[bytes], list[_Addressed], list[SendResult]]:
        """The ``/email/batchWithTemplates`` body for ``recipients`` as pieces, the recipients
        it carries and the results of those refused (an address no header can carry).

        Plain readers of a :class:`~digest.delivery.readers.Readers` batch are written by the
        C module from :meth:`_program`; the others (every reader, without the module) by
        :meth:`_message`. Both write the same bytes."""
        made, skeleton = self._prepared(template)
        header_prefix: HeaderPrefixes = ({}, {})
        messages: list[bytes] = []
        included: list[_Addressed] = []
        refused: list[SendResult] = []
        if isinstance(recipients, Readers) and (filled := recipients.fill(self._program(template))) is not None:
            for index, (row, piece) in enumerate(zip(recipients.rows, filled[0])):
                if piece is not None:
                    messages.append(piece)
                    included.append(row)
                    continue
                self._add(recipients.recipient(index), made, skeleton, header_prefix, messages, included, refused)
        else:
            for r in recipients:
                self._add(r, made, skeleton, header_prefix, messages, included, refused)
        if not messages:
            return [b'{"Messages":[]}'], included, refused
        # One copy of the whole: the opening and the closing joined to the end messages.
        messages[0] = b'{"Messages":[' + messages[0]
        messages[-1] += b"]}"
        return [b",".join(messages)], included, refused

    def _add(self, r: TemplateRecipient, made: ServerTemplate, skeleton: _Skeleton, header_prefix: HeaderPrefixes,
             messages: list[bytes], included: list[_Addressed], refused: list[SendResult]) -> None:
        """One reader's message, written in Python (see :meth:`_messages`), or its refusal.
        Written as bytes with each value escaped once, not through ``json.dumps``: this runs
        for every reader without the C module."""
        html_values, text_values = r.html_values, r.text_values
        try:
            to = reader_to(r, len(SLOT_NAMES))
        except ValueError as exc:
            refused.append(SendResult(ledger_id=r.ledger_id, status="invalid", error=str(exc)))
            return
        html = [json_escape(v) for v in html_values]
        # The text values are usually the HTML ones (signed links, plain names).
        if text_values == html_values:
            text = html
        elif any(text_values[i] != html_values[i] for i in made.plain):
            # The template gives these slots' text their HTML value (see plain_slots):
            # a reader for whom they differ cannot be sent this template as it is.
            refused.append(SendResult(ledger_id=r.ledger_id, status="invalid",
                                      error="a link differs escaped for HTML and for text"))
            return
        else:
            text = [json_escape(v) for v in text_values]
        run = [skeleton.lead, to, skeleton.model]
        for key, is_html, index in skeleton.keys:
            run += (key, html[index] if is_html else text[index])
        run += (skeleton.meta, b"%d" % r.ledger_id)
        skeleton.end.write(run, r.headers, header_prefix)
        messages.append(b"".join(run))
        included.append(r)

    def _program(self, template: TemplateMessage) -> tuple[Step, ...]:
        """A plain reader's message as a program for the C module: :meth:`_add`'s bytes, with
        the reader's values as fields (see :mod:`digest.delivery.readers`)."""
        _made, skeleton = self._prepared(template)
        steps: list[Step] = [skeleton.lead, TO, skeleton.model]
        for key, _is_html, index in skeleton.keys:
            steps += (key, SLOT_FIELDS[index])
        return (*steps, skeleton.meta, LEDGER, *skeleton.end.program())

    def build_template_request(self, template: TemplateMessage, recipients: Sequence[TemplateRecipient]
                               ) -> PreparedCall:
        """The one ``/email/batchWithTemplates`` request for a batch. Pure: no I/O (the
        template is not created here: a dry run builds this and creates nothing). Refused
        recipients are in ``PreparedCall.refused``; ``messages`` is empty (the send reads the
        answer against the recipients it carries)."""
        return self._call(template, recipients)[0]

    def _call(self, template: TemplateMessage, recipients: Sequence[TemplateRecipient]
              ) -> tuple[PreparedCall, list[_Addressed]]:
        parts, included, refused = self._messages(template, recipients)
        call = PreparedCall("POST", self.batch_templates_url, self._post_headers, b"".join(parts), (),
                            tuple(refused))
        return call, included

    def send_template_batch(self, template: TemplateMessage, recipients: Sequence[TemplateRecipient]
                            ) -> list[SendResult]:
        """One call for the whole batch (after creating the draft's template, the first time)."""
        return self.template_sender(template, recipients)()

    def template_sender(self, template: TemplateMessage, recipients: Sequence[TemplateRecipient]
                        ) -> Callable[[], list[SendResult]]:
        """The batch's request, built now; the returned function makes sure the template exists,
        then sends the request (again, for a retry) and returns one result per recipient."""
        if not recipients:
            return list
        self._check_batch(recipients)
        call, carried = self._call(template, recipients)
        self.check_size(call)
        ids = [r.ledger_id for r in carried]
        order = ledger_ids(recipients)

        def answer(status: int, headers: Mapping[str, str], reply: bytes, _ids: Sequence[int]) -> list[SendResult]:
            self.raise_for_common_status(status, headers, reply)
            if status == 422:
                error = self.api_error(status, reply)
                if "template" in str(error).lower():
                    self._forget(template)
                    raise BlockedError(f"postmark: the batch names template {self._alias(template)}, "
                                       f"which Postmark refused: {error}", status=status,
                                       response_text=response_text(reply), hint=_HINT)
                raise error
            return self._check_template_refusals(template, self._results(status, reply, carried))

        return partial(self._send, template, call, ids, order, answer)

    def _send(self, template: TemplateMessage, call: PreparedCall, ids: Sequence[int], order: Sequence[int],
              answer: Callable[[int, Mapping[str, str], bytes, Sequence[int]], list[SendResult]]
              ) -> list[SendResult]:
        if ids:
            self.ensure_template(template)  # before the batch: if it fails, nothing was sent
        return self.send_built_template(call, ids, order, answer)

    def _alias(self, template: TemplateMessage) -> str:
        return self._prepared(template)[0].alias

    def _forget(self, template: TemplateMessage) -> None:
        with self._made_lock:
            self._made.discard(self._alias(template))

    def _check_template_refusals(self, template: TemplateMessage, results: list[SendResult]) -> list[SendResult]:
        """Messages refused with an error about the template (deleted in Postmark meanwhile,
        say) were not sent, whatever the rest of the batch got: they go back to the queue
        (``deferred``) and the template is made again before the next batch. A batch refused
        whole that way stops the send instead of being asked again and again. (Postmark's
        ErrorCode for this was not found documented: the message names the template.)"""
        if all(r.status != "rejected" for r in results):
            return results
        refused = [r.status == "rejected" and "template" in (r.error or "").lower() for r in results]
        if not any(refused):
            return results
        self._forget(template)
        if all(refused):
            raise BlockedError(f"postmark: every message of the batch was refused: {results[0].error}",
                               hint=f"the template {self._alias(template)} may have been deleted in Postmark; "
                                    "the next send creates it again")
        return [SendResult(r.ledger_id, "deferred", None, f"not sent: {r.error}") if gone else r
                for r, gone in zip(results, refused, strict=True)]


def _cleanup_error(failed: Sequence[tuple[str, DeliveryError]]) -> DeliveryError:
    """One error for the templates :meth:`PostmarkTemplateProvider.template_done` could not
    delete: each failure's line, and a hint naming them."""
    names = ", ".join(alias for alias, _error in failed)
    first = failed[0][1]
    return DeliveryError("; ".join(str(error.args[0]) for _alias, error in failed), status=first.status,
                         response_text=first.response_text,
                         hint=f"delete the template{'s' if len(failed) > 1 else ''} {names} in Postmark by hand")


def _error_of(body: bytes) -> tuple[int | None, str]:
    """Postmark's ``ErrorCode`` and ``Message`` from an error body, if it has them."""
    try:
        data: Any = json.loads(body)
    except ValueError:
        return None, response_text(body)
    if not isinstance(data, dict):
        return None, response_text(body)
    try:
        code = int(data.get("ErrorCode"))  # type: ignore[arg-type]
    except (TypeError, ValueError):
        code = None
    return code, str(data.get("Message", ""))
