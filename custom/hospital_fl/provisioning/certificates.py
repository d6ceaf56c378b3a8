"""Certificate checks on a FLARE startup kit, shared by `site check` and `kit verify`.

A kit's mTLS identity is three PEM files in startup/: the participant's certificate, its
private key and the project's root CA. These functions read them with ``cryptography`` only
(no nvflare), and return what is wrong as sentences that name the file and the fix, so
either command can put them in its table.

Secrets (the private keys, the hospitals' HE context with the shared secret key, the root
CA's state) are written 0600 (``restrict_secrets``) and a kit where one is readable by group
or others fails ``kit verify`` (``mode_problems``).
"""

from __future__ import annotations

import datetime as dt
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID

__all__ = [
    "CLIENT_CRT",
    "CLIENT_KEY",
    "ROOT_CA",
    "Credentials",
    "as_utc",
    "utc_text",
    "common_name",
    "load_credentials",
    "issuer_problems",
    "self_signed_problems",
    "key_problems",
    "validity_problems",
    "certificate_problems",
    "SECRET_MODE",
    "is_secret",
    "restrict_secrets",
    "mode_problems",
]

CLIENT_CRT, CLIENT_KEY, ROOT_CA = "startup/client.crt", "startup/client.key", "startup/rootCA.pem"
SECRET_MODE = 0o600
# FLARE's names: every participant's *.key, the hospitals' client_context.tenseal (HEBuilder,
# the consortium's CKKS secret key), the provisioner's state/cert.json (the root CA's private key).
_SECRET_NAMES = ("client_context.tenseal",)
_FROM_OPERATOR = "use the kit the consortium operator provisioned for this site"


@dataclass(frozen=True)
class Credentials:
    """A kit's certificate, private key and root CA as loaded (None where one did not load).

    Attributes:
        cert: the participant's certificate.
        key: its private key.
        ca: the root CA certificate.
        problems: why any of the three did not load, one sentence each.
    """

    cert: x509.Certificate | None
    key: object | None
    ca: x509.Certificate | None
    problems: tuple[str, ...]


def as_utc(now: dt.datetime | None) -> dt.datetime:
    """``now`` as an aware UTC time: the current time when None; a naive time is taken as UTC."""
    if now is None:
        return dt.datetime.now(dt.timezone.utc)
    return now.replace(tzinfo=dt.timezone.utc) if now.tzinfo is None else now


def utc_text(value: dt.datetime) -> str:
    """A time as "2026-01-31 12:00:00 UTC" (a naive time is taken as UTC)."""
    return as_utc(value).astimezone(dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def common_name(name: x509.Name) -> str:
    """The CN of a certificate subject or issuer ("" when it has none)."""
    attrs = name.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(attrs[0].value) if attrs else ""


def load_credentials(
    kit: str | Path, crt_name: str = CLIENT_CRT, key_name: str = CLIENT_KEY, ca_name: str = ROOT_CA
) -> Credentials:
    """Load the certificate, key and root CA named relative to the kit folder."""
    kit = Path(kit)
    problems: list[str] = []

    def load_cert(name: str):
        try:
            return x509.load_pem_x509_certificate((kit / name).read_bytes())
        except OSError as err:
            problems.append(f"{name} cannot be read ({type(err).__name__}: {err})")
        except ValueError as err:
            problems.append(f"{name} is not a PEM certificate ({err}); unpack the kit again")
        return None

    cert, ca = load_cert(crt_name), load_cert(ca_name)
    try:
        key = serialization.load_pem_private_key((kit / key_name).read_bytes(), password=None)
    except OSError as err:
        key = None
        problems.append(f"{key_name} cannot be read ({type(err).__name__}: {err})")
    except (ValueError, TypeError, UnsupportedAlgorithm) as err:
        key = None
        problems.append(f"{key_name} is not an unencrypted PEM private key ({err}); unpack the kit again")
    return Credentials(cert, key, ca, tuple(problems))


def issuer_problems(cert: x509.Certificate, ca: x509.Certificate, crt_name: str, ca_name: str) -> list[str]:
    """Whether ``ca`` signed ``cert``: its signature must verify with the CA's public key."""
    try:
        cert.verify_directly_issued_by(ca)
    except InvalidSignature:
        return [
            f"{crt_name} was not issued by {ca_name} (its signature does not verify with that CA's key); "
            + _FROM_OPERATOR
        ]
    except (ValueError, TypeError) as err:
        return [f"{crt_name} was not issued by {ca_name} ({err}); " + _FROM_OPERATOR]
    return []


def self_signed_problems(ca: x509.Certificate, ca_name: str) -> list[str]:
    """A root CA names itself as issuer and its signature verifies with its own key."""
    try:
        ca.verify_directly_issued_by(ca)
    except (InvalidSignature, ValueError, TypeError) as err:
        detail = "its signature does not verify with its own key" if isinstance(err, InvalidSignature) else err
        return [f"{ca_name} is not a self-signed root CA ({detail}); " + _FROM_OPERATOR]
    return []


def key_problems(cert: x509.Certificate, key, crt_name: str, key_name: str) -> list[str]:
    """The private key is the one whose public half the certificate carries."""
    spki = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    try:
        same = key.public_key().public_bytes(*spki) == cert.public_key().public_bytes(*spki)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        same = False
    if same:
        return []
    return [
        f"{key_name} does not belong to {crt_name} (its public key differs); "
        "unpack the key and certificate from the same kit"
    ]


def validity_problems(label: str, cert: x509.Certificate, now: dt.datetime) -> list[str]:
    """What is wrong with ``cert``'s validity dates at ``now`` (aware UTC)."""
    before, after = cert.not_valid_before_utc, cert.not_valid_after_utc
    if now < before:
        return [f"{label} is not valid before {utc_text(before)} (it is {utc_text(now)} here: check the server clock)"]
    if now > after:
        return [f"{label} expired on {utc_text(after)} (ask the consortium operator for a newly provisioned kit)"]
    return []


def certificate_problems(
    kit: str | Path,
    now: dt.datetime,
    crt_name: str = CLIENT_CRT,
    key_name: str = CLIENT_KEY,
    ca_name: str = ROOT_CA,
) -> tuple[list[str], str]:
    """(problems, summary) of the kit's certificate, its key and its root CA at ``now``.

    The summary names the participant and its issuer; it is "" when the certificate does not load.
    """
    creds = load_credentials(kit, crt_name, key_name, ca_name)
    cert, key, ca = creds.cert, creds.key, creds.ca
    problems = list(creds.problems)
    if cert is not None and ca is not None:
        problems += issuer_problems(cert, ca, crt_name, ca_name)
    if ca is not None:
        problems += validity_problems(ca_name, ca, now)
    if cert is not None:
        problems += validity_problems(crt_name, cert, now)
    if cert is not None and key is not None:
        problems += key_problems(cert, key, crt_name, key_name)
    summary = ""
    if cert is not None:
        role = Path(crt_name).stem
        summary = (
            f"{role} {cert.subject.rfc4514_string()} issued by {cert.issuer.rfc4514_string()}, "
            f"valid until {utc_text(cert.not_valid_after_utc)}"
        )
    return problems, summary


def is_secret(path: Path) -> bool:
    """Whether a kit or provisioning file holds a secret (a private key or the HE secret key)."""
    path = Path(path)
    root_ca_state = path.name == "cert.json" and path.parent.name == "state"
    return path.suffix == ".key" or path.name in _SECRET_NAMES or root_ca_state


def restrict_secrets(folder: Path) -> list[Path]:
    """chmod 0600 every secret under ``folder`` (0700 for a state/ folder holding one); returns them."""
    found = []
    for root, _, files in os.walk(folder):
        for name in files:
            path = Path(root) / name
            if is_secret(path) and not path.is_symlink():
                os.chmod(path, SECRET_MODE)
                found.append(path)
                if path.parent.name == "state":
                    os.chmod(path.parent, 0o700)
    return found


def mode_problems(folder: Path) -> list[tuple[str, str]]:
    """(path relative to ``folder``, octal mode) of each secret readable or writable by group or others."""
    folder = Path(folder)
    out = []
    for root, _, files in os.walk(folder):
        for name in sorted(files):
            path = Path(root) / name
            if not is_secret(path):
                continue
            mode = stat.S_IMODE(path.lstat().st_mode)
            if mode & 0o077:
                out.append((path.relative_to(folder).as_posix(), f"{mode:04o}"))
    return sorted(out)
