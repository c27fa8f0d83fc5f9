"""The exception tree. Every error ``digest`` raises on purpose is a ``DigestError``::

    DigestError                     root; ``hint`` is one line the CLI prints instead of a traceback
    ├── ConfigError                 a config key is wrong, missing or of the wrong type
    ├── StoreError                  the database failed; sending stops at once (fail closed)
    ├── SourceError                 a source could not be fetched or parsed
    ├── RenderError                 a template or the MJML compile failed
    ├── DraftError                  a draft is missing or in the wrong state for the action
    │   └── DraftBusyError          another process is sending the draft: try again once it has finished
    ├── SubscriberError             a subscriber address or import row is invalid
    ├── TokenError                  a signed link is invalid, expired or used
    ├── DeliveryError               a provider call failed; ``retryable`` says whether to try again
    │   └── AuthError               the provider refused our credentials: stop the send
    └── WebhookVerificationError    a webhook's signature, credentials or freshness check failed
"""

from __future__ import annotations


class DigestError(Exception):
    """Root of every error raised on purpose. ``hint`` tells the user what to do."""

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.hint = hint

    def __str__(self) -> str:
        message = super().__str__()
        return f"{message} ({self.hint})" if self.hint else message


class ConfigError(DigestError):
    """The configuration is invalid; the message names the file and the key."""


class StoreError(DigestError):
    """The database could not be read or written."""


class FreezeStopped(DigestError):
    """A stop came while a send's audience was being frozen: the freeze was cut short and
    rolled back, so the draft is as it was (approved, no ledger rows)."""


class TakenOverError(StoreError):
    """Another sender took over a batch (or the draft's lease) from this one, which it took
    for stopped: this sender stops, and what it would have recorded is left as the other
    sender recorded it (uncertain, at worst: rule 1)."""


class SourceError(DigestError):
    """A source could not be fetched or parsed. ``status`` is the HTTP status, when there was one."""

    def __init__(self, message: str, *, status: int | None = None, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.status = status


class RenderError(DigestError):
    """A template could not be rendered or compiled."""


class DraftError(DigestError):
    """A draft is missing or not in a state that allows the action."""


class DraftBusyError(DraftError):
    """Another process is sending the draft, and holds its send lease: the change to its ledger
    waits until that send has finished or stopped."""


class SubscriberError(DigestError):
    """A subscriber record or import row is invalid."""


class TokenError(DigestError):
    """A signed token is invalid, expired, already used or bound to other content."""


class DeliveryError(DigestError):
    """A provider call failed. ``retryable`` is true for network errors, 429 and 5xx."""

    def __init__(
        self,
        message: str,
        *,
        retryable: bool = False,
        status: int | None = None,
        retry_after: float | None = None,
        response_text: str | None = None,
        hint: str | None = None,
    ) -> None:
        super().__init__(message, hint=hint)
        self.retryable = retryable
        self.status = status
        self.retry_after = retry_after
        self.response_text = response_text


class BlockedError(DeliveryError):
    """The provider will take no batch as things stand, whoever it is for: an account, quota or
    configuration problem (a quota used up, sending paused or suspended, a domain or sender
    not verified or unknown, a wrong URL, requests too large). Nothing in the batch was sent,
    and nothing about its readers is wrong: the sender puts the batch back in the queue and
    stops until the operator fixes it (``hint`` says what), instead of failing readers."""


class AuthError(BlockedError):
    """The provider rejected the credentials; nothing more can be sent until config is fixed."""


class WebhookVerificationError(DigestError):
    """A webhook request failed verification and was not applied."""
