"""Store URLs that carry no secret into any record.

A sweep's store URLs are written into many records: the workspace's spec.yaml and sweep.json, the
parent MLflow run's spec.json, the Ray Job's uploaded spec, Tune's pickled experiment state (the
trainable's SweepContext), console output and error messages. So a URL is kept everywhere in the
form the user wrote it, with any literal password replaced by `***`, and turned into the URL a client
connects with only at the moment of use (`usable_url`), in the process that uses it:

- `${NAME}` references are resolved from that process's environment (the head's, for a Ray Job's
  driver; each worker's own, for the MLflow URL), and never written back resolved;
- a password shown as `***` is dropped, so each client takes its secret from its standard place:
  libpq's PGPASSWORD or ~/.pgpass for PostgreSQL, MLFLOW_TRACKING_USERNAME/PASSWORD for an MLflow
  server (an http(s) URL's user and password are moved there too: MLflow's client reads them there,
  and an error message that quotes the URL then quotes no password);
- `postgresql://` gets the driver the project ships (psycopg2): SQLAlchemy 2.1 maps the plain scheme
  to psycopg 3.

A URL that embeds a literal password keeps working on this machine (`register_credentials`: one
warning that says how to move it out; the password stays in this process's memory and, for the MLflow
URL, in the environment the local Ray workers inherit). For a cluster it is refused: the secret would
travel in the job's upload, and the head should hold it (`check_no_literal_secrets`).
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Iterable
from urllib.parse import parse_qsl, quote, unquote, urlencode, urlsplit

REDACTED = "***"
ENV_REFERENCE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
# Query parameters that carry a secret in some store URLs (e.g. PostgreSQL's ?password=).
SECRET_PARAMS = ("password", "passwd", "pwd", "secret", "token", "access_key", "secret_key", "sslpassword")
POSTGRES_SCHEMES = ("postgresql", "postgres")
# What the project installs for PostgreSQL: the plain scheme is turned into this one.
POSTGRES_DRIVER = "postgresql+psycopg2"
MLFLOW_USER_ENV, MLFLOW_PASSWORD_ENV = "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"

# Redacted URL -> the URL as written, for URLs with a literal password that this process registered.
_REGISTERED: dict[str, str] = {}


class CredentialInURLWarning(UserWarning):
    """A store URL embeds a password: it works, but belongs in the client's own secret store."""


def _userinfo(url: str) -> tuple[str, str, str] | None:
    """(scheme://, userinfo, host and the rest) of a URL whose authority has a userinfo, else None.

    Split by hand rather than by urlsplit: the user's `${NAME}` references must survive untouched."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return None
    end = min((i for i in (rest.find("/"), rest.find("?"), rest.find("#")) if i >= 0), default=len(rest))
    authority, tail = rest[:end], rest[end:]
    userinfo, at, host = authority.rpartition("@")
    if not at:
        return None
    return f"{scheme}://", userinfo, host + tail


def _is_reference(text: str) -> bool:
    return bool(text) and ENV_REFERENCE.fullmatch(text) is not None


def literal_password(url: str | None) -> bool:
    """Whether `url` holds a password itself (not `***`, not a `${NAME}` reference)."""
    if not url:
        return False
    parts = _userinfo(url)
    if parts is not None:
        _, password = _split_userinfo(parts[1])
        if password and password != REDACTED and not _is_reference(password):
            return True
    return any(
        key.lower() in SECRET_PARAMS and value != REDACTED and not _is_reference(value)
        for key, value in _query(url)
    )


def _split_userinfo(userinfo: str) -> tuple[str, str | None]:
    user, colon, password = userinfo.partition(":")
    return user, (password if colon else None)


def _query(url: str) -> list[tuple[str, str]]:
    _, _, query = url.partition("?")
    return parse_qsl(query.split("#")[0], keep_blank_values=True)


def redact_url(url: str | None) -> str | None:
    """`url` with every literal password shown as `***`: the form every record and message holds.

    postgresql://user:secret@host/db -> postgresql://user:***@host/db; `${NAME}` references are kept."""
    if not url:
        return url
    parts = _userinfo(url)
    if parts is not None:
        prefix, userinfo, rest = parts
        user, password = _split_userinfo(userinfo)
        if password and not _is_reference(password):
            url = f"{prefix}{user}:{REDACTED}@{rest}"
    if "?" in url and any(key.lower() in SECRET_PARAMS for key, _ in _query(url)):
        base, _, query = url.partition("?")
        query, hash_sep, fragment = query.partition("#")
        pairs = [
            (k, v if k.lower() not in SECRET_PARAMS or _is_reference(v) else REDACTED)
            for k, v in parse_qsl(query, keep_blank_values=True)
        ]
        url = f"{base}?{urlencode(pairs, safe='*${}')}{hash_sep}{fragment}"
    return url


def without_userinfo(url: str) -> str:
    """`url` with no user or password at all: a link for a browser, which asks for them itself."""
    parts = _userinfo(url)
    return url if parts is None else parts[0] + parts[2]


def resolve_references(url: str, field: str) -> str:
    """`${NAME}` -> the value of NAME in this process's environment (percent-encoded in the user and
    password, where a '@' or ':' in the value would otherwise change the URL's meaning)."""

    def value(match: re.Match, encode: bool) -> str:
        name = match.group(1)
        if name not in os.environ:
            from orchestrator.spec.spec import SpecError

            raise SpecError(
                f"{field}: {redact_url(url)!r} refers to ${{{name}}}, which is not set in the environment "
                f"of this machine; export {name}=... where the store is used (on a cluster: the head's "
                "environment, see README: Clusters)"
            )
        found = os.environ[name]
        return quote(found, safe="") if encode else found

    parts = _userinfo(url)
    if parts is None:
        return ENV_REFERENCE.sub(lambda m: value(m, False), url)
    prefix, userinfo, rest = parts
    userinfo = ENV_REFERENCE.sub(lambda m: value(m, True), userinfo)
    return f"{prefix}{userinfo}@{ENV_REFERENCE.sub(lambda m: value(m, False), rest)}"


def usable_url(url: str, field: str = "storage") -> str:
    """The URL a client connects with, from the recorded form (see the module docstring)."""
    url = _REGISTERED.get(url, url)
    url = resolve_references(url, field)
    parts = _userinfo(url)
    if parts is not None:
        prefix, userinfo, rest = parts
        user, password = _split_userinfo(userinfo)
        if password == REDACTED:
            password = None  # the client's own secret store has it (PGPASSWORD, ~/.pgpass, ...)
        if prefix.startswith(("http://", "https://")):
            # MLflow's client reads its credentials from the environment on every request.
            if user:
                os.environ[MLFLOW_USER_ENV] = unquote(user)
            if password is not None:
                os.environ[MLFLOW_PASSWORD_ENV] = unquote(password)
            url = prefix + rest
        else:
            url = f"{prefix}{user}{':' + password if password is not None else ''}@{rest}"
    if "?" in url and any(v == REDACTED for _, v in _query(url)):
        base, _, query = url.partition("?")
        pairs = [(k, v) for k, v in parse_qsl(query, keep_blank_values=True) if v != REDACTED]
        url = f"{base}?{urlencode(pairs)}" if pairs else base
    scheme, sep, rest = url.partition("://")
    if sep and scheme in POSTGRES_SCHEMES:
        url = f"{POSTGRES_DRIVER}://{rest}"
    return url


def _move_out_hint(field: str, url: str) -> str:
    scheme = urlsplit(url.replace("${", "").replace("}", "")).scheme.split("+")[0]
    if scheme in ("http", "https"):
        return (
            f"set {MLFLOW_USER_ENV} and {MLFLOW_PASSWORD_ENV} (or MLFLOW_TRACKING_TOKEN) in the environment "
            "and leave them out of the URL"
        )
    if scheme in POSTGRES_SCHEMES:
        return "put it in ~/.pgpass (host:port:database:user:password, mode 0600) or PGPASSWORD, and leave it out of the URL"
    if scheme in ("s3", "gs", "gcs", "abfs", "az"):
        return (
            "leave credentials out of the URL: each node's cloud SDK takes them from its own chain "
            "(an instance role or service account, AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, "
            "GOOGLE_APPLICATION_CREDENTIALS)"
        )
    return "leave it out of the URL and give it to the client in its own way (an environment variable, a config file)"


def register_credentials(storage, fields: Iterable[str] = ("optuna", "mlflow")) -> None:
    """For a sweep run from this machine: a store URL with a literal password keeps working, with one
    warning that says how to move the password out; every record shows it as `***`."""
    for field in fields:
        url = getattr(storage, field)
        if not literal_password(url):
            continue
        shown = redact_url(url)
        if shown not in _REGISTERED:
            warnings.warn(
                f"storage.{field}: {shown} embeds a password. It is used for this run and kept out of every "
                f"record (shown as {REDACTED}); later commands (status, resume, compare, report) read it "
                f"from the client's own place, so {_move_out_hint(field, url)}",
                CredentialInURLWarning,
                stacklevel=2,
            )
        _REGISTERED[shown] = url
        if field == "mlflow":
            _export_for_workers(url)


def _export_for_workers(url: str) -> None:
    """The trial workers that this machine's Ray starts inherit this process's environment: give them
    the MLflow URL's password where their client reads it, since the URL they get is redacted."""
    parts = _userinfo(url)
    if parts is None:
        return
    prefix, userinfo, _ = parts
    user, password = _split_userinfo(userinfo)
    if password is None:
        return
    if prefix.startswith(("http://", "https://")):
        os.environ[MLFLOW_USER_ENV] = unquote(user)
        os.environ[MLFLOW_PASSWORD_ENV] = unquote(password)
    elif prefix.split("+")[0].split(":")[0] in POSTGRES_SCHEMES:
        os.environ["PGPASSWORD"] = unquote(password)


def check_no_literal_secrets(storage, fields: Iterable[str], why: str) -> None:
    """Raise SpecError for a store URL that holds a password itself, where `why` it must not."""
    from orchestrator.spec.spec import SpecError

    for field in fields:
        url = getattr(storage, field)
        if literal_password(url):
            raise SpecError(
                f"storage.{field}: {redact_url(url)} embeds a password, {why}; {_move_out_hint(field, url)}, "
                "or write ${NAME} in its place and set NAME where the store is used"
            )
