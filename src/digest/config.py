"""YAML + ``${ENV}`` secrets → validated, frozen settings.

Every error is a :class:`ConfigError` whose message names the file and the key, on one line.
Each source type validates its own block (see ``digest.sources.registry``); the provider block
is validated here because every provider shares its shape.
"""

from __future__ import annotations

import ipaddress
import os
import re
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from digest.errors import ConfigError

DEFAULT_CONFIG_NAME = "config.yaml"
_ENV_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
PROVIDERS = ("outbox", "postmark", "sendgrid", "mailgun", "ses", "resend", "smtp")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Newsletter(_Strict):
    name: str = "Field Notes Digest"
    from_: str = Field("Field Notes <digest@example.org>", alias="from")
    reply_to: str | None = None
    postal_address: str = "Field Notes, 12 Example Lane, Springfield"
    public_url: str = "http://127.0.0.1:8080"
    timezone: str = "UTC"

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    @field_validator("timezone")
    @classmethod
    def _tz(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown timezone {value!r} (use an IANA name such as Europe/Paris)") from None
        return value

    @field_validator("from_", "reply_to")
    @classmethod
    def _mailbox(cls, value: str | None) -> str | None:
        """One address, as every send parses it (``parse_mailbox``, then ``format_address``):
        a From every send refuses passed `digest check` and stopped the first send instead."""
        if not value:
            return value
        import email.utils

        from digest.delivery.mime import format_address, parse_mailbox

        try:
            format_address(*parse_mailbox(value))
        except ValueError as exc:
            raise ValueError(f"{value!r} is not an address a send can use ({exc}): write one such as "
                             "\"Field Notes <digest@example.org>\"") from None
        if len(email.utils.getaddresses([value])) > 1:  # a send would take the first and drop the rest
            raise ValueError(f"{value!r} is more than one address (write one)")
        return value

    @field_validator("public_url")
    @classmethod
    def _url(cls, value: str) -> str:
        if not re.match(r"^https?://[^/\s]+", value):
            raise ValueError(f"must be an http(s) URL, got {value!r}")
        return value.rstrip("/")

    @property
    def tz(self) -> ZoneInfo:
        return ZoneInfo(self.timezone)


class Database(_Strict):
    url: str = "sqlite:///digest.db"

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        if not (value.startswith("sqlite") or value.startswith("postgresql")):
            raise ValueError("must start with sqlite:/// or postgresql+psycopg://")
        if value.startswith("sqlite") and _in_memory(value):
            # Every command is its own process: subscribers, drafts and the ledger (what was
            # sent to whom) would be gone when it ends, and the next send would start over.
            raise ValueError("an in-memory SQLite database keeps nothing once the command ends: "
                             "name a file (e.g. sqlite:///digest.db)")
        return value


def _in_memory(url: str) -> bool:
    """Whether a SQLite URL names no file: ``sqlite://``, ``sqlite:///``, ``:memory:``, or a
    URI filename in memory (``file::memory:``, ``mode=memory``)."""
    rest = url.partition("://")[2]
    path = rest.removeprefix("/").partition("?")[0]
    return path in ("", ":memory:") or path.startswith("file::memory:") or "mode=memory" in rest


class Ranking(_Strict):
    min_score: float = 0
    per_essay: int = Field(3, ge=0)
    max_comments: int = Field(12, ge=0)
    min_words: int = Field(0, ge=0)
    max_words: int = Field(250, ge=1)
    one_per_author: bool = True
    exclude_authors: tuple[str, ...] = ()
    author_replies: Literal["context", "exclude"] = "context"
    confidence: bool = True
    half_life_days: float | None = Field(None, gt=0)


class Approval(_Strict):
    required: bool = True
    approvers: tuple[str, ...] = ()
    deadline: str = "24h"
    on_deadline: Literal["skip", "approve"] = "skip"

    @field_validator("deadline")
    @classmethod
    def _deadline(cls, value: str) -> str:
        parse_duration(value)
        return value


class DigestSettings(_Strict):
    schedule: str = "0 7 * * mon"
    collect_schedule: str = "0 * * * *"
    send_schedule: str = "*/5 * * * *"
    max_essays: int = Field(10, ge=1)
    subject: str = "{name}: {first_title}"
    intro: str = ""
    approval: Approval = Approval()


# delivery.rate_per_second when the config leaves it out: provider calls per second. Resend
# allows 2 requests a second per team unless raised on request; a new SES account out of the
# sandbox sends 14 messages a second (one message per call here). The others publish no limit
# for sending that a digest comes near.
DEFAULT_RATES: dict[str, float] = {"resend": 2.0, "ses": 14.0}
DEFAULT_RATE = 50.0
# delivery.concurrency when the config leaves it out. With server-side personalization a batch
# is one request for a thousand readers, built under the interpreter lock: two in flight
# already keep one building while the other is on the wire (four measured no faster, and held
# two more built requests in memory: a million Mailgun readers peaked at 64.0-65.1 MB against
# 63.1 at two). Full bodies and one-call-per-message providers wait on the network more.
SERVER_SIDE = ("sendgrid", "mailgun")
DEFAULT_CONCURRENCY = 4
SERVER_SIDE_CONCURRENCY = 2


# delivery keys that only some providers read. Set for another provider they would do nothing,
# and their owner believe them in effect. Not here: the keys every provider reads, api_key and
# base_url (a provider that reads neither, SES or SMTP, needs credentials and a server of its
# own, checked below, so one left over cannot stand in for them), and the outbox, both ways: it
# stands in for the real provider while trying digest out, with that provider's keys left in
# place, and its outbox_dir does nothing once a real one is set.
PROVIDER_KEYS: dict[str, tuple[str, ...]] = {
    "message_stream": ("postmark",),
    "domain": ("mailgun",),
    "region": ("mailgun", "ses"),
    **dict.fromkeys(("aws_access_key_id", "aws_secret_access_key", "aws_session_token", "configuration_set"),
                    ("ses",)),
    **dict.fromkeys(("smtp_host", "smtp_port", "smtp_security", "smtp_verify", "smtp_ca_file", "username",
                     "password"), ("smtp",)),
}


def is_local(host: str) -> bool:
    """Whether ``host`` is this machine: localhost (and ``*.localhost``), 127.0.0.0/8, ::1."""
    host = host.lower().strip("[]")
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _truthy(raw: Any) -> bool:
    """A raw boolean setting as pydantic will read it (a YAML boolean, or text from an ${ENV}
    placeholder such as "true")."""
    return raw is True or str(raw).strip().lower() in ("true", "1", "yes", "on", "t", "y")


class Delivery(_Strict):
    provider: Literal["outbox", "postmark", "sendgrid", "mailgun", "ses", "resend", "smtp"] = "outbox"
    api_key: str | None = None
    base_url: str | None = None
    batch_size: int | None = Field(None, ge=1)
    rate_per_second: float = Field(DEFAULT_RATE, gt=0)
    timeout: float = Field(30, gt=0)
    max_retries: int = Field(5, ge=0)
    outbox_dir: str = "outbox"
    message_stream: str = "broadcast"
    # Providers that fill per-recipient values in themselves (SendGrid, Mailgun) get one
    # template per batch instead of one full body per recipient when this is on.
    server_side_personalization: bool = True
    # postmark: personalize server-side too, through a Postmark template the send creates for
    # the draft (and deletes when it has finished). Off by default: it creates objects in the
    # operator's Postmark server, which allows a limited number of templates. Effective only
    # while server_side_personalization is on.
    postmark_templates: bool = False
    # Parallel calls inside one batch, for providers that send one message per call (SES).
    concurrency: int = Field(DEFAULT_CONCURRENCY, ge=1, le=32)
    # Sender processes for one draft, all claiming from the same ledger: the way to use more
    # than one core. delivery.rate_per_second is shared among them.
    processes: int = Field(1, ge=1, le=32)
    # mailgun: the sending domain, and "us" or "eu"; ses: the AWS region (e.g. eu-west-1).
    domain: str | None = None
    region: str | None = None
    # ses
    aws_access_key_id: str | None = None
    aws_secret_access_key: str | None = None
    aws_session_token: str | None = None
    configuration_set: str | None = None
    # smtp
    smtp_host: str | None = None
    smtp_port: int | None = Field(None, ge=1, le=65535)
    smtp_security: Literal["starttls", "tls", "none"] = "starttls"
    smtp_verify: bool = True
    smtp_ca_file: str | None = None
    username: str | None = None
    password: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _provider_defaults(cls, data: Any) -> Any:
        """Each provider's own defaults for ``rate_per_second`` and ``concurrency`` (see
        DEFAULT_RATES and SERVER_SIDE)."""
        if not isinstance(data, dict):
            return data
        provider = str(data.get("provider") or "outbox")
        if data.get("rate_per_second") is None:
            data = {**data, "rate_per_second": DEFAULT_RATES.get(provider, DEFAULT_RATE)}
        if data.get("concurrency") is None:
            # The raw value: a YAML boolean, or text from an ${ENV} placeholder ("false").
            raw = data.get("server_side_personalization", True)
            off = raw is False or str(raw).strip().lower() in ("false", "0", "no", "off", "f", "n")
            server_side = not off and (provider in SERVER_SIDE or (
                provider == "postmark" and _truthy(data.get("postmark_templates", False))))
            data = {**data, "concurrency": SERVER_SIDE_CONCURRENCY if server_side else DEFAULT_CONCURRENCY}
        return data

    @model_validator(mode="after")
    def _needs_key(self) -> Delivery:
        provider = self.provider
        if provider in ("postmark", "sendgrid", "mailgun", "resend") and not self.api_key:
            raise ValueError(f"provider {provider} needs delivery.api_key")
        if self.postmark_templates and provider != "postmark":
            raise ValueError(f"delivery.postmark_templates is for provider postmark, not {provider}")
        if provider == "mailgun":
            if not self.domain:
                raise ValueError("provider mailgun needs delivery.domain (the sending domain)")
            if "/" in self.domain or "%" in self.domain:
                # Why: a '/' in the path makes Mailgun answer 200 "Mailgun Magnificent API"
                # instead of sending or failing.
                raise ValueError(f"delivery.domain must be a bare domain name, got {self.domain!r}")
            if self.region not in (None, "us", "eu"):
                raise ValueError(f"delivery.region must be us or eu, got {self.region!r}")
        if provider == "ses":
            if not self.region:
                raise ValueError("provider ses needs delivery.region (e.g. eu-west-1)")
            if not re.fullmatch(r"[a-z]{2}(-[a-z]+)+-\d{1,2}", self.region):
                raise ValueError(f"delivery.region is not an AWS region: {self.region!r}")
            if not (self.aws_access_key_id and self.aws_secret_access_key):
                raise ValueError(
                    "provider ses needs delivery.aws_access_key_id and "
                    "delivery.aws_secret_access_key"
                )
        if provider == "smtp":
            if not self.smtp_host:
                raise ValueError("provider smtp needs delivery.smtp_host")
            if bool(self.username) != bool(self.password):
                raise ValueError("set both delivery.username and delivery.password, or neither")
        return self

    @property
    def smtp_port_or_default(self) -> int:
        """``smtp_port``, else the usual port for ``smtp_security`` (587, 465, 25)."""
        if self.smtp_port is not None:
            return self.smtp_port
        return {"starttls": 587, "tls": 465, "none": 25}[self.smtp_security]


class Web(_Strict):
    listen: str = "127.0.0.1:8080"
    secret_key: str | None = None

    @field_validator("listen")
    @classmethod
    def _listen(cls, value: str) -> str:
        host, _, port = value.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"must be host:port, got {value!r}")
        address = host.removeprefix("[").removesuffix("]")
        if ":" in address or re.fullmatch(r"[\d.]+", address):  # meant as an IP address: is it one?
            try:
                ipaddress.ip_address(address)
            except ValueError:
                raise ValueError(f"{host!r} is not an IP address (use e.g. 127.0.0.1:8080)") from None
        return value


_TOPIC_ARN_RE = re.compile(r"^arn:aws[a-z-]*:sns:[a-z0-9-]+:\d{12}:[A-Za-z0-9_.-]{1,256}$")


# How old a signed Mailgun timestamp may be, unless webhooks.mailgun_max_age says otherwise.
# Mailgun's retries (5, 10 and 15 minutes apart, then 1, 2 and 4 hours: 5, 15 and 30 minutes
# after a failed answer, then over 8 hours; documentation.mailgun.com, webhook retries) keep
# the first attempt's signature and timestamp, so with the five minutes of the others every
# retry was refused as stale and the event lost whenever this endpoint failed once (a
# restart). An hour takes the first three retries. Longer lets a forged event ride a Mailgun
# signature seen elsewhere (another endpoint of the account) for longer: Mailgun signs only
# its token, not the event.
MAILGUN_MAX_AGE = 3600


class Webhooks(_Strict):
    """Provider webhook secrets (DESIGN.md rule 7).

    A provider whose secret is missing refuses every webhook it sends (fail closed): an
    unconfigured endpoint must never become an open door for forged bounces or unsubscribes.
    """

    # Seconds a signed timestamp may be away from now (either way) before a request is stale;
    # Mailgun's has its own (see MAILGUN_MAX_AGE).
    max_age: int = Field(300, ge=1)
    mailgun_max_age: int = Field(MAILGUN_MAX_AGE, ge=1)
    postmark_username: str | None = None
    postmark_password: str | None = None
    sendgrid_public_key: str | None = None
    mailgun_signing_key: str | None = None
    resend_secret: str | None = None
    ses_topic_arns: tuple[str, ...] = ()

    def max_age_for(self, provider: str) -> int:
        """How old a signed timestamp from ``provider`` may be."""
        return self.mailgun_max_age if provider == "mailgun" else self.max_age

    @field_validator("sendgrid_public_key")
    @classmethod
    def _sendgrid_key(cls, value: str | None) -> str | None:
        if value:
            from digest.web.webhooks.sendgrid import load_public_key

            load_public_key(value)  # ValueError names what is wrong with it
        return value or None

    @field_validator("resend_secret")
    @classmethod
    def _resend_secret(cls, value: str | None) -> str | None:
        if value:
            from digest.web.webhooks.resend import decode_secret

            decode_secret(value)
        return value or None

    @field_validator("ses_topic_arns")
    @classmethod
    def _topic_arns(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for arn in value:
            if not _TOPIC_ARN_RE.match(arn):
                raise ValueError(f"{arn!r} is not an SNS topic ARN (arn:aws:sns:REGION:ACCOUNT:NAME)")
        return value

    @model_validator(mode="after")
    def _postmark_pair(self) -> Webhooks:
        # One without the other is almost certainly a typo; accepting it would silently refuse
        # every Postmark webhook, so say so at load time instead.
        if bool(self.postmark_username) != bool(self.postmark_password):
            raise ValueError("set both postmark_username and postmark_password, or neither")
        return self


class Settings(_Strict):
    """The whole validated configuration."""

    newsletter: Newsletter = Newsletter()
    database: Database = Database()
    templates: str | None = None
    sources: tuple[dict[str, Any], ...] = ()
    ranking: Ranking = Ranking()
    digest: DigestSettings = DigestSettings()
    delivery: Delivery = Delivery()
    web: Web = Web()
    webhooks: Webhooks = Webhooks()

    # Where the config came from; relative paths resolve against its folder.
    path: str | None = Field(None, exclude=True)

    def resolve(self, value: str) -> Path:
        """A path from the config, relative to the config file's folder."""
        p = Path(value).expanduser()
        if p.is_absolute() or self.path is None:
            return p
        return Path(self.path).parent / p


def parse_duration(value: str) -> float:
    """``90s``, ``30m``, ``24h``, ``2d`` → seconds."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd])\s*", value)
    if not match:
        raise ValueError(f"bad duration {value!r} (use e.g. 30m, 24h, 2d)")
    unit = {"s": 1, "m": 60, "h": 3600, "d": 86400}[match.group(2)]
    return float(match.group(1)) * unit


# Keys that hold a secret or a credential, wherever they are (delivery, web, webhooks, a source's
# block). Given in config.yaml itself (not through ${ENV}), such a value is taken as an ${ENV}
# one is: stripped of the spaces and newlines around it, and refused when nothing is left.
SECRET_KEYS = frozenset({
    "api_key", "api_username", "username", "password", "secret_key",
    "aws_access_key_id", "aws_secret_access_key", "aws_session_token",
    "postmark_username", "postmark_password", "sendgrid_public_key", "mailgun_signing_key", "resend_secret",
})


def _strip_secrets(node: Any, where: str, file: str) -> Any:
    """``node`` with every secret written in the file (see :data:`SECRET_KEYS`) stripped, as one
    from the environment is (:func:`_substitute`): a quoted token with a space or a newline
    around it reached the provider as it was (an HTTP header refuses a trailing newline, and a
    key with a space is another key), and one of spaces signed links with a space. An empty
    one is said to be empty; null (or no key) leaves a secret unset. Before ``${ENV}``
    placeholders are replaced: their values are the environment's, stripped there (and a
    default written empty, ``${NAME:-}``, stays an explicit "unset")."""
    if isinstance(node, dict):
        out = {}
        for key, value in node.items():
            here = f"{where}.{key}" if where else str(key)
            if key in SECRET_KEYS and isinstance(value, str):
                stripped = value.strip()
                if not stripped:
                    state = "empty" if value == "" else "only whitespace"
                    raise ConfigError(f"{file}: {here}: is {state}",
                                      hint="write the secret, or null (or leave the key out) to leave it unset")
                out[key] = stripped
            else:
                out[key] = _strip_secrets(value, here, file)
        return out
    if isinstance(node, list):
        return [_strip_secrets(v, f"{where}[{i}]", file) for i, v in enumerate(node)]
    return node


def _substitute(node: Any, where: str, file: str) -> Any:
    if isinstance(node, dict):
        return {k: _substitute(v, f"{where}.{k}" if where else str(k), file) for k, v in node.items()}
    if isinstance(node, list):
        return [_substitute(v, f"{where}[{i}]", file) for i, v in enumerate(node)]
    if isinstance(node, str):

        def repl(m: re.Match[str]) -> str:
            name, default = m.group(1), m.group(2)
            raw = os.environ.get(name)
            # Stripped: a secret copied with a space or a newline around it reached the provider
            # as it was (an HTTP header refuses a trailing newline, and a key with a space is
            # another key). No setting means anything by spaces around it.
            value = raw.strip() if raw is not None else None
            if not value:
                if default is not None:
                    return default
                state = "not set" if raw is None else "empty" if raw == "" else "only whitespace"
                raise ConfigError(f"{file}: {where}: environment variable {name} is {state}")
            return value

        return _ENV_RE.sub(repl, node)
    return node


def _loc(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out.replace("from_", "from")


def _validation_message(exc: ValidationError, file: str) -> str:
    err = exc.errors()[0]
    loc = _loc(tuple(p for p in err["loc"] if p not in ("function-after",)))
    kind = err["type"]
    if kind == "extra_forbidden":
        return f"{file}: {loc}: unknown key"
    msg = err["msg"].removeprefix("Value error, ")
    if kind == "missing":
        msg = "required key is missing"
    return f"{file}: {loc}: {msg}" if loc else f"{file}: {msg}"


def from_dict(raw: dict[str, Any] | None, *, file: str = "<defaults>", path: str | None = None) -> Settings:
    """Validate a raw mapping (already parsed YAML) into :class:`Settings`."""
    raw = dict(raw or {})
    raw = _substitute(_strip_secrets(raw, "", file), "", file)
    try:
        settings = Settings.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_validation_message(exc, file)) from exc
    settings = settings.model_copy(update={"path": path})
    _check_public_url(settings, file)
    _check_base_url(settings, file)
    _check_provider_keys(settings, file)
    url = settings.database.url
    if url.startswith("sqlite:///") and path is not None:
        # Like every path in the config, a relative SQLite file is relative to the config file.
        db_path = url.removeprefix("sqlite:///")
        if db_path and db_path != ":memory:" and not Path(db_path).is_absolute():
            resolved = Database(url=f"sqlite:///{Path(path).parent / db_path}")
            settings = settings.model_copy(update={"database": resolved})
    _check_schedules(settings, file)
    _check_sources(settings, file)
    return settings


def _check_public_url(settings: Settings, file: str) -> None:
    # RFC 8058: mailbox providers offer one-click unsubscribe only for an https URL. Plain
    # http is allowed for a local address (trying digest out) and for the outbox provider.
    public = settings.newsletter.public_url
    local = is_local(urlsplit(public).hostname or "")
    if public.startswith("http://") and not local and settings.delivery.provider != "outbox":
        raise ConfigError(f"{file}: newsletter.public_url: must be https:// (one-click unsubscribe "
                          "links must be https, RFC 8058)")


def _check_base_url(settings: Settings, file: str) -> None:
    """delivery.base_url is http(s)://host[:port][/path]: the provider's calls are made by
    appending to it, and carry the API key, so plain http only to this machine (a local test
    server). Checked here, for a config, and not in :class:`Delivery`: tests build one with a
    URL no config would pass, to see what the provider does with it."""
    value = settings.delivery.base_url
    if not value:
        return
    parts = urlsplit(value)
    try:
        valid = parts.port != 0
    except ValueError:  # a port out of range, or not a number
        valid = False
    if (not valid or parts.scheme not in ("http", "https") or not parts.hostname or parts.query
            or parts.fragment or any(c.isspace() for c in value)):
        shown = re.sub(r"(//[^/@:]*:)[^/@]*@", r"\1***@", value)  # a password in it stays hidden
        raise ConfigError(f"{file}: delivery.base_url: must be http(s)://host[:port][/path], got {shown!r}")
    if parts.scheme == "http" and not is_local(parts.hostname):
        raise ConfigError(f"{file}: delivery.base_url: must be https:// (the API key would travel in clear; plain "
                          "http only to localhost, 127.0.0.1 or ::1)")


def _check_provider_keys(settings: Settings, file: str) -> None:
    """Refuse delivery keys of another provider (PROVIDER_KEYS): ``region: eu`` under SendGrid,
    SMTP credentials under Postmark were accepted and did nothing. A key at its default (or
    null, or empty) is not counted: config.example.yaml lists every key at its default, and
    changing the provider must not make it fail. Checked here, for a config, and not in
    :class:`Delivery`, which tests build with one provider's keys to drive another's code."""
    delivery = settings.delivery
    provider = delivery.provider
    if provider == "outbox":
        return
    foreign = {}
    for key, users in PROVIDER_KEYS.items():
        value = getattr(delivery, key)
        if provider not in users and value not in (None, "") and value != Delivery.model_fields[key].default:
            foreign[key] = users
    if foreign:
        listed = ", ".join(f"{key} (for {' or '.join(users)})" for key, users in foreign.items())
        what = "is" if len(foreign) == 1 else "are"
        raise ConfigError(f"{file}: delivery: {listed} {what} not read by provider {provider}: remove "
                          f"{'it' if len(foreign) == 1 else 'them'}, or set delivery.provider")


def _check_schedules(settings: Settings, file: str) -> None:
    from digest.scheduler import parse_cron

    for key in ("schedule", "collect_schedule", "send_schedule"):
        expr = getattr(settings.digest, key)
        try:
            parse_cron(expr, settings.newsletter.timezone)
        except ValueError as exc:
            raise ConfigError(f"{file}: digest.{key}: bad cron {expr!r}: {exc}") from exc


def _check_sources(settings: Settings, file: str) -> None:
    from digest.sources.registry import validate_source_block

    names: set[str] = set()
    for i, block in enumerate(settings.sources):
        where = f"sources[{i}]"
        if not isinstance(block, dict):
            raise ConfigError(f"{file}: {where}: must be a mapping with name and type")
        try:
            validate_source_block(block)
        except ValidationError as exc:
            raise ConfigError(_validation_message(exc, file).replace(f"{file}: ", f"{file}: {where}.", 1)) from exc
        except ValueError as exc:
            raise ConfigError(f"{file}: {where}: {exc}") from exc
        name = block["name"]
        if name in names:
            raise ConfigError(f"{file}: {where}.name: duplicate source name {name!r}")
        names.add(name)


def _parse_yaml(text: str, file: str) -> Any:
    """``yaml.safe_load``, refusing a mapping key given twice at any depth: PyYAML keeps the
    last one silently, so a second ``delivery:`` block threw the first away (and with it the
    provider: the outbox "sent" to every reader)."""
    import yaml

    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _refuse_duplicate_keys(node, file)
        return loader.construct_document(node)
    finally:
        loader.dispose()


def _refuse_duplicate_keys(root: Any, file: str) -> None:
    """Every mapping under ``root`` (a composed YAML node) has each plain key once. Merge keys
    (``<<: *defaults``) are not counted: overriding what they bring in is what they are for."""
    import yaml

    todo, visited = [root], set()
    while todo:
        node = todo.pop()
        if id(node) in visited:  # an alias: the same node again
            continue
        visited.add(id(node))
        if isinstance(node, yaml.MappingNode):
            seen: set[tuple[str, str]] = set()
            for key, _value in node.value:
                if isinstance(key, yaml.ScalarNode) and key.tag != "tag:yaml.org,2002:merge":
                    if (key.tag, key.value) in seen:
                        raise ConfigError(f"{file}: line {key.start_mark.line + 1}: key {key.value!r} given twice")
                    seen.add((key.tag, key.value))
            todo += [part for pair in reversed(node.value) for part in reversed(pair)]  # in file order
        elif isinstance(node, yaml.SequenceNode):
            todo += reversed(node.value)


def load(path: str | os.PathLike[str] | None = None) -> Settings:
    """Load ``path``, else ``$DIGEST_CONFIG``, else ``./config.yaml``, else the embedded defaults."""
    # Imported here: only reading a config file needs PyYAML, not a process handed its settings.
    import yaml

    explicit = path is not None or bool(os.environ.get("DIGEST_CONFIG"))
    chosen = Path(path or os.environ.get("DIGEST_CONFIG") or DEFAULT_CONFIG_NAME)
    if not chosen.exists():
        if explicit:
            raise ConfigError(f"{chosen}: config file not found", hint="run `digest init` to write one")
        return defaults()
    file = str(chosen)
    try:
        data = chosen.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{file}: cannot read: {exc.strerror}") from exc
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise ConfigError(f"{file}: byte {exc.start + 1} (line {line}) is not UTF-8 (save the file as UTF-8)") from None
    try:
        raw = _parse_yaml(text, file)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{file}:{where} is not valid YAML: {getattr(exc, 'problem', exc)}") from exc
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{file}: the top level must be a mapping of keys")
    return from_dict(raw, file=file, path=str(chosen.resolve()))


def defaults(workdir: str | os.PathLike[str] | None = None, public_url: str | None = None) -> Settings:
    """The embedded defaults: SQLite in ``workdir``, the bundled sample, the outbox provider."""
    from digest.sources.folder import SAMPLE_DIR

    base = Path(workdir) if workdir is not None else Path.cwd()
    raw: dict[str, Any] = {
        "database": {"url": f"sqlite:///{base / 'digest.db'}"},
        "sources": [{"name": "sample", "type": "folder", "path": str(SAMPLE_DIR)}],
        "delivery": {"provider": "outbox", "outbox_dir": str(base / "outbox")},
    }
    if public_url:
        raw["newsletter"] = {"public_url": public_url}
    return from_dict(raw, file="<embedded defaults>", path=str(base / DEFAULT_CONFIG_NAME))
