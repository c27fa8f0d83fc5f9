from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from digest import config
from digest.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "config.yaml"
    p.write_text(text, encoding="utf-8")
    return p


def test_example_config_loads_and_documents_every_key(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = config.load(ROOT / "config.example.yaml")
    assert [s["type"] for s in settings.sources] == ["folder", "feed", "wordpress", "substack"]
    example = (ROOT / "config.example.yaml").read_text()
    # Every settings field appears in the example file (undocumented keys fail here).
    for section in ("newsletter", "database", "ranking", "delivery", "web", "webhooks"):
        model = type(getattr(settings, section))
        for field_name, field in model.model_fields.items():
            key = field.alias or field_name
            assert f"{key}:" in example, f"{section}.{key} is not documented in config.example.yaml"
    for field_name in config.DigestSettings.model_fields:
        assert f"{field_name}:" in example
    for field_name in config.Approval.model_fields:
        assert f"{field_name}:" in example


def test_example_config_is_valid_yaml_mapping() -> None:
    raw = yaml.safe_load((ROOT / "config.example.yaml").read_text())
    assert set(raw) == {"newsletter", "database", "templates", "sources", "ranking", "digest", "delivery", "web",
                        "webhooks"}


def test_no_config_file_gives_embedded_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DIGEST_CONFIG", raising=False)
    settings = config.load()
    assert settings.delivery.provider == "outbox"
    assert settings.sources[0]["type"] == "folder"
    assert str(tmp_path) in settings.database.url


def test_explicit_missing_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        config.load(tmp_path / "nope.yaml")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("newsletter:\n  nmae: x\n", "config.yaml: newsletter.nmae: unknown key"),
        ("bogus: 1\n", "config.yaml: bogus: unknown key"),
        ("ranking:\n  per_essay: lots\n", "config.yaml: ranking.per_essay: Input should be a valid integer"),
        ("digest:\n  schedule: '61 * * * *'\n", "config.yaml: digest.schedule: bad cron '61 * * * *'"),
        ("digest:\n  schedule: 'every monday'\n", "config.yaml: digest.schedule: bad cron"),
        ("newsletter:\n  timezone: Mars/Olympus\n",
         "config.yaml: newsletter.timezone: unknown timezone 'Mars/Olympus'"),
        ("delivery:\n  provider: postmark\n", "config.yaml: delivery: provider postmark needs delivery.api_key"),
        ("delivery:\n  provider: carrier-pigeon\n", "config.yaml: delivery.provider: Input should be"),
        ("sources:\n  - {name: a, type: rss}\n", "config.yaml: sources[0]: unknown source type 'rss'"),
        ("sources:\n  - {name: a, type: feed}\n", "config.yaml: sources[0].url: required key is missing"),
        ("sources:\n  - {name: a, type: folder, path: x, colour: red}\n",
         "config.yaml: sources[0].colour: unknown key"),
        ("sources:\n  - {name: a, type: folder, path: x}\n  - {name: a, type: folder, path: y}\n",
         "config.yaml: sources[1].name: duplicate source name 'a'"),
        ("digest:\n  approval:\n    deadline: soon\n", "config.yaml: digest.approval.deadline: bad duration 'soon'"),
        ("web:\n  listen: localhost\n", "config.yaml: web.listen: must be host:port"),
        ("web:\n  listen: '127.0.0.1:80000'\n", "config.yaml: web.listen: must be host:port"),
        ("web:\n  listen: '256.1.1.1:8080'\n", "config.yaml: web.listen: '256.1.1.1' is not an IP address"),
        ("web:\n  listen: '[::g]:8080'\n", "config.yaml: web.listen: '[::g]' is not an IP address"),
        ("- just\n- a list\n", "the top level must be a mapping"),
        ("newsletter: [unclosed\n", "is not valid YAML"),
    ],
)
def test_errors_are_one_line_naming_file_and_key(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        config.load(write(tmp_path, text))
    rendered = str(info.value)
    assert message in rendered
    assert "\n" not in rendered


def test_env_secrets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, "delivery:\n  provider: postmark\n  api_key: ${PM_TOKEN}\n")
    monkeypatch.delenv("PM_TOKEN", raising=False)
    with pytest.raises(ConfigError, match=r"config.yaml: delivery.api_key: environment variable PM_TOKEN is not set"):
        config.load(path)
    monkeypatch.setenv("PM_TOKEN", "secret-token")
    assert config.load(path).delivery.api_key == "secret-token"


def test_env_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DIGEST_NAME", raising=False)
    path = write(tmp_path, "newsletter:\n  name: ${DIGEST_NAME:-Weekly Notes}\n")
    assert config.load(path).newsletter.name == "Weekly Notes"


def test_relative_paths_resolve_against_the_config_folder(tmp_path: Path) -> None:
    path = write(tmp_path, "templates: ./mine\n")
    settings = config.load(path)
    assert settings.templates is not None
    assert settings.resolve(settings.templates) == tmp_path / "mine"


def test_parse_duration() -> None:
    assert config.parse_duration("90s") == 90
    assert config.parse_duration("30m") == 1800
    assert config.parse_duration("24h") == 86400
    assert config.parse_duration("2d") == 172800
    with pytest.raises(ValueError):
        config.parse_duration("1 week")


def test_relative_sqlite_path_is_relative_to_the_config_file(tmp_path: Path) -> None:
    path = write(tmp_path, "database:\n  url: sqlite:///data/digest.db\n")
    assert config.load(path).database.url == f"sqlite:///{tmp_path / 'data' / 'digest.db'}"


def test_every_source_type_and_its_keys_are_documented_in_the_example() -> None:
    from digest.sources.registry import SOURCES, comment_blocks, source_class

    settings = config.load(ROOT / "config.example.yaml")
    example = (ROOT / "config.example.yaml").read_text()
    blocks = list(settings.sources) + [c for b in settings.sources for c in comment_blocks(b)]
    documented = {b["type"] for b in blocks}
    assert documented == set(SOURCES), f"undocumented source types: {set(SOURCES) - documented}"
    for type_name in SOURCES:
        for field_name in source_class(type_name).config_model.model_fields:
            assert f"{field_name}:" in example or field_name in ("name", "type", "comments"), (
                f"{type_name}.{field_name} is not documented in config.example.yaml")


def test_public_url_must_be_https_for_real_providers(tmp_path: Path) -> None:
    text = "newsletter: {public_url: 'http://news.example.org'}\ndelivery: {provider: postmark, api_key: k}\n"
    with pytest.raises(ConfigError, match="newsletter.public_url: must be https://"):
        config.load(write(tmp_path, text))
    local = "newsletter: {public_url: 'http://127.0.0.1:8080'}\ndelivery: {provider: postmark, api_key: k}\n"
    assert config.load(write(tmp_path, local)).newsletter.public_url == "http://127.0.0.1:8080"


@pytest.mark.parametrize(("delivery", "rate"), [
    ({"provider": "resend", "api_key": "re_x"}, 2.0),  # Resend: 2 requests a second per team
    ({"provider": "ses", "region": "eu-west-1", "aws_access_key_id": "a", "aws_secret_access_key": "b"}, 14.0),
    ({"provider": "postmark", "api_key": "t"}, 50.0),
    ({"provider": "resend", "api_key": "re_x", "rate_per_second": 10}, 10.0),  # the operator's own
    ({"provider": "resend", "api_key": "re_x", "rate_per_second": None}, 2.0),  # null: the default
])
def test_rate_per_second_defaults_to_the_providers_limit(delivery: dict[str, object], rate: float) -> None:
    settings = config.from_dict({"delivery": delivery, "newsletter": {"public_url": "https://news.example.org"}},
                                file="test.yaml")
    assert settings.delivery.rate_per_second == rate


@pytest.mark.parametrize(("delivery", "concurrency"), [
    ({"provider": "sendgrid", "api_key": "k"}, 2),  # one request a thousand readers: two in flight do
    ({"provider": "mailgun", "api_key": "k", "domain": "mg.example.org"}, 2),
    ({"provider": "sendgrid", "api_key": "k", "server_side_personalization": False}, 4),  # full bodies
    ({"provider": "sendgrid", "api_key": "k", "server_side_personalization": "false"}, 4),  # from ${ENV}
    ({"provider": "postmark", "api_key": "t"}, 4),
    ({"provider": "mailgun", "api_key": "k", "domain": "mg.example.org", "concurrency": 8}, 8),
])
def test_concurrency_defaults_by_how_the_provider_is_sent_to(delivery: dict[str, object], concurrency: int) -> None:
    settings = config.from_dict({"delivery": delivery, "newsletter": {"public_url": "https://news.example.org"}},
                                file="test.yaml")
    assert settings.delivery.concurrency == concurrency


@pytest.mark.parametrize(("text", "line", "key"), [
    # A second block threw the first away: here the provider, and the outbox "sent" to everyone.
    ("delivery:\n  provider: postmark\n  api_key: k\nnewsletter: {name: x}\ndelivery:\n  batch_size: 10\n",
     5, "delivery"),
    ("delivery:\n  provider: outbox\n  outbox_dir: a\n  outbox_dir: b\n", 4, "outbox_dir"),
    ("sources:\n  - {name: a, type: folder, path: x, path: y}\n", 2, "path"),
])
def test_a_key_given_twice_is_refused(tmp_path: Path, text: str, line: int, key: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        config.load(path)
    assert str(info.value) == f"{path}: line {line}: key {key!r} given twice"


def test_merge_keys_may_override_what_they_bring_in(tmp_path: Path) -> None:
    path = write(tmp_path, "sources:\n  - &a {name: a, type: folder, path: x}\n  - <<: *a\n    name: b\n")
    assert [s["name"] for s in config.load(path).sources] == ["a", "b"]


def test_a_config_file_that_is_not_utf8_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_bytes("newsletter:\n  name: Caf\u00e9 Notes\n".encode("latin-1"))
    with pytest.raises(ConfigError) as info:
        config.load(path)
    assert str(info.value) == f"{path}: byte 24 (line 2) is not UTF-8 (save the file as UTF-8)"


@pytest.mark.parametrize("url", ["sqlite://", "sqlite:///", "sqlite:///:memory:", "sqlite+pysqlite:///:memory:",
                                 "sqlite:///file::memory:?cache=shared&uri=true",
                                 "sqlite:///file:d.db?mode=memory&uri=true"])
def test_an_in_memory_database_is_refused(tmp_path: Path, url: str) -> None:
    """Each command is its own process: an in-memory database loses the subscribers, the drafts
    and the ledger of what was sent when it ends."""
    path = write(tmp_path, f'database: {{url: "{url}"}}\n')
    with pytest.raises(ConfigError) as info:
        config.load(path)
    assert str(info.value) == (f"{path}: database.url: an in-memory SQLite database keeps nothing once the "
                               "command ends: name a file (e.g. sqlite:///digest.db)")


@pytest.mark.parametrize("url", ["sqlite:///digest.db", "sqlite:////var/lib/digest/digest.db",
                                 "sqlite:///memory.db"])
def test_a_sqlite_file_is_accepted(tmp_path: Path, url: str) -> None:
    assert config.load(write(tmp_path, f'database: {{url: "{url}"}}\n')).database.url.endswith(".db")


@pytest.mark.parametrize(("base_url", "message"), [
    ("not a url", "delivery.base_url: must be http(s)://host[:port][/path], got 'not a url'"),
    ("https://api.example.org/v3?x=1", "delivery.base_url: must be http(s)://host[:port][/path]"),
    ("https://api.example.org:99999", "delivery.base_url: must be http(s)://host[:port][/path]"),
    ("https://u:hunter2@api.example.org:x", "got 'https://u:***@api.example.org:x'"),
    ("http://api.example.org", "delivery.base_url: must be https:// (the API key would travel in clear; plain "
                               "http only to localhost, 127.0.0.1 or ::1)"),
])
def test_base_url_is_checked_at_load(tmp_path: Path, base_url: str, message: str) -> None:
    path = write(tmp_path, f"delivery: {{provider: postmark, api_key: k, base_url: '{base_url}'}}\n")
    with pytest.raises(ConfigError) as info:
        config.load(path)
    assert message in str(info.value) and "hunter2" not in str(info.value)


@pytest.mark.parametrize("base_url", ["https://api.eu.sendgrid.com", "https://api.example.org/v3/",
                                      "http://127.0.0.1:8025", "http://localhost:9000", "http://[::1]:80"])
def test_a_base_url_over_https_or_to_this_machine_is_accepted(tmp_path: Path, base_url: str) -> None:
    path = write(tmp_path, f"delivery: {{provider: sendgrid, api_key: k, base_url: '{base_url}'}}\n")
    assert config.load(path).delivery.base_url == base_url


def test_keys_of_another_provider_are_refused(tmp_path: Path) -> None:
    """They were accepted and did nothing (SendGrid reads no region, no SMTP login)."""
    path = write(tmp_path, "delivery:\n  provider: sendgrid\n  api_key: k\n  smtp_host: smtp.example.org\n"
                           "  username: u\n  password: p\n  region: eu\n  aws_access_key_id: AKIA\n")
    with pytest.raises(ConfigError) as info:
        config.load(path)
    assert str(info.value) == (f"{path}: delivery: region (for mailgun or ses), aws_access_key_id (for ses), "
                               "smtp_host (for smtp), username (for smtp), password (for smtp) are not read by "
                               "provider sendgrid: remove them, or set delivery.provider")
    path = write(tmp_path, "delivery: {provider: smtp, smtp_host: smtp.example.org, message_stream: outbound}\n")
    with pytest.raises(ConfigError, match=r"delivery: message_stream \(for postmark\) is not read by provider "
                                          r"smtp: remove it, or set delivery.provider$"):
        config.load(path)
    # The outbox stands in for the real provider while trying digest out, its keys left in place.
    assert config.load(write(tmp_path, "delivery: {provider: outbox, api_key: k, region: eu}\n")).delivery.api_key


@pytest.mark.parametrize(("provider", "keys"), [
    ("outbox", {}),
    ("postmark", {"api_key": "k"}),
    ("sendgrid", {"api_key": "k"}),
    ("mailgun", {"api_key": "k", "domain": "mg.example.org"}),
    ("resend", {"api_key": "k"}),
    ("ses", {"region": "eu-west-1", "aws_access_key_id": "a", "aws_secret_access_key": "b"}),
    ("smtp", {"smtp_host": "smtp.example.org"}),
])
def test_the_example_config_loads_with_each_provider(tmp_path: Path, provider: str, keys: dict[str, str]) -> None:
    """Every key is in the example at its default: changing the provider (and giving what it
    needs) must not trip over the other providers' keys."""
    text = (ROOT / "config.example.yaml").read_text().replace("provider: outbox ", f"provider: {provider} ")
    for key, value in keys.items():
        text, n = re.subn(rf"^  {key}: null ", f"  {key}: {value} ", text, flags=re.MULTILINE)
        assert n == 1, key
    text = text.replace("public_url: http://127.0.0.1:8080", "public_url: https://news.example.org")
    assert config.load(write(tmp_path, text)).delivery.provider == provider


@pytest.mark.parametrize(("value", "state"), [("", "empty"), ("  \n", "only whitespace")])
def test_an_empty_env_secret_is_named_as_empty(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, value: str,
                                               state: str) -> None:
    """It was "not set" (it is set, to nothing); one of spaces reached the provider."""
    path = write(tmp_path, "delivery:\n  provider: postmark\n  api_key: ${PM_TOKEN}\n")
    monkeypatch.setenv("PM_TOKEN", value)
    with pytest.raises(ConfigError) as info:
        config.load(path)
    assert str(info.value) == f"{path}: delivery.api_key: environment variable PM_TOKEN is {state}"


def test_spaces_around_an_env_secret_are_dropped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A token pasted with a newline reached requests as it was, and failed as an InvalidHeader."""
    path = write(tmp_path, "delivery:\n  provider: postmark\n  api_key: ${PM_TOKEN}\n")
    monkeypatch.setenv("PM_TOKEN", " secret-token\n")
    assert config.load(path).delivery.api_key == "secret-token"


@pytest.mark.parametrize(("where", "text"), [
    ("delivery.api_key", 'delivery:\n  provider: postmark\n  api_key: " secret-token\\n"\n'),
    ("delivery.password",
     'delivery:\n  provider: smtp\n  smtp_host: mail.example.org\n  username: " me "\n'
     '  password: "\\tsecret-token "\n'),
    ("web.secret_key", 'web:\n  secret_key: "  secret-token  "\n'),
    ("webhooks.mailgun_signing_key", 'webhooks:\n  mailgun_signing_key: "secret-token\\r\\n"\n'),
    ("sources[0].comments.api_key",
     "sources:\n  - {name: blog, type: feed, url: https://blog.example.org/feed,\n"
     '     comments: {type: discourse, base_url: https://forum.example.org, api_key: " secret-token ",\n'
     '                api_username: " system "}}\n'),
], ids=["api_key", "smtp_login", "secret_key", "mailgun_signing_key", "discourse_api_key"])
def test_spaces_around_a_secret_in_the_file_are_dropped(tmp_path: Path, where: str, text: str) -> None:
    """As for a secret from the environment: a quoted token with a space or a newline around
    it reached the provider (or signed links) as it was."""
    settings = config.load(write(tmp_path, text))
    value: object = settings.model_dump(by_alias=False)
    for part in where.replace("[0]", ".0").split("."):
        value = value[int(part)] if isinstance(value, (list, tuple)) else value[part]  # type: ignore[index]
    assert value == "secret-token"
    if where == "delivery.password":
        assert settings.delivery.username == "me"
    if where.startswith("sources"):
        assert settings.sources[0]["comments"]["api_username"] == "system"


@pytest.mark.parametrize(("value", "state"), [('""', "empty"), ('"  \\n"', "only whitespace"),
                                              ("' '", "only whitespace")], ids=["empty", "spaces_newline", "space"])
@pytest.mark.parametrize(("block", "where"), [
    ("delivery:\n  provider: postmark\n  api_key: {}\n", "delivery.api_key"),
    ("web:\n  secret_key: {}\n", "web.secret_key"),
    ("webhooks:\n  postmark_username: me\n  postmark_password: {}\n", "webhooks.postmark_password"),
], ids=["api_key", "secret_key", "postmark_password"])
def test_an_empty_secret_in_the_file_is_named_as_empty(tmp_path: Path, value: str, state: str, block: str,
                                                       where: str) -> None:
    """As for one from the environment: an empty api_key was "provider postmark needs
    delivery.api_key", and a secret_key of spaces signed every link with spaces."""
    path = write(tmp_path, block.format(value))
    with pytest.raises(ConfigError) as info:
        config.load(path)
    assert str(info.value).startswith(f"{path}: {where}: is {state} (")
    assert "\n" not in str(info.value)


def test_a_secret_left_unset_in_the_file_stays_unset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """null, no key, or an ${ENV} placeholder with an empty default: unset, as before."""
    monkeypatch.delenv("DIGEST_TEST_UNSET", raising=False)
    settings = config.load(write(tmp_path, "web:\n  secret_key: null\n"
                                           "webhooks:\n  resend_secret: ${DIGEST_TEST_UNSET:-}\n"))
    assert settings.web.secret_key is None and settings.webhooks.resend_secret is None
    assert settings.webhooks.mailgun_signing_key is None
