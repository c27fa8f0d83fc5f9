"""Provider name → class, loaded lazily. Adding a provider is one line here."""

from __future__ import annotations

import importlib

import requests

from digest.config import Delivery
from digest.delivery.providers.base import Provider
from digest.errors import ConfigError

PROVIDERS: dict[str, str] = {
    "outbox": "digest.delivery.providers.outbox:OutboxProvider",
    "postmark": "digest.delivery.providers.postmark:PostmarkProvider",
    "sendgrid": "digest.delivery.providers.sendgrid:SendGridProvider",
    "mailgun": "digest.delivery.providers.mailgun:MailgunProvider",
    "ses": "digest.delivery.providers.ses:SesProvider",
    "resend": "digest.delivery.providers.resend:ResendProvider",
    "smtp": "digest.delivery.providers.smtp:SmtpProvider",
}


def provider_class(name: str) -> type[Provider]:
    """The class for ``delivery.provider`` ``name``; :class:`ConfigError` if there is none yet."""
    try:
        target = PROVIDERS[name]
    except KeyError:
        available = ", ".join(sorted(PROVIDERS))
        raise ConfigError(
            f"delivery.provider: {name!r} is not available yet (available: {available})"
        ) from None
    module, _, attr = target.partition(":")
    cls: type[Provider] = getattr(importlib.import_module(module), attr)
    return cls


def build_provider(settings: Delivery, session: requests.Session | None = None) -> Provider:
    """The provider ``settings.provider`` names, built from the delivery settings (in the
    variant they opt into, such as Postmark with ``postmark_templates``)."""
    return provider_class(settings.provider).variant(settings)(settings, session)
