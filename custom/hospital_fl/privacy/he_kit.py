"""The HE facts provisioning writes into each kit, for what the server cannot compute and the
sites must not take from the server.

``startup/hospital_fl_he.json`` (signed with the rest of startup/ in an HE kit):

- server kit: ``{"role": "server", "key_id": ...}``. The hospitals' key id
  (hospital_fl.privacy.he.context_fingerprint) needs the secret key, which the server never
  holds; provisioning computes it from the hospitals' context, and the server pins it from
  the first update on (a ciphertext under another key is refused even when it arrives first
  or alone).
- hospital kit: ``{"role": "client", "key_id": ..., "hospitals": N, "min_aggregate_sites": K}``.
  N is the number of hospitals in the consortium when the kit was made, K the site's policy
  (hospitals/<site>.yaml ``privacy.min_aggregate_sites``, default 3). The site decrypts an
  aggregate only when it sums at least ``min(K, N)`` hospitals: a consortium of two can run
  HE, and the server cannot lower the bar by announcing small rounds.

Pure functions on plain data and files; the FLARE side reads the file through FLARE's
SecurityContentService so its signature is checked (hospital_fl.flare.he).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from hospital_fl.errors import InputError

__all__ = [
    "HE_KIT_FILE",
    "DEFAULT_MIN_AGGREGATE_SITES",
    "HEKitFacts",
    "facts_from_json",
    "read_kit_facts",
    "write_kit_facts",
    "provision_kit_facts",
]

HE_KIT_FILE = "hospital_fl_he.json"
DEFAULT_MIN_AGGREGATE_SITES = 3
_KEY_ID = re.compile(r"^[0-9a-f]{64}$")
_CLIENT_CONTEXT = "client_context.tenseal"  # FLARE's HEBuilder names (ProvFileName)
_REPROVISION = "re-provision the consortium (hospital-fl provision), which writes this file into every HE kit"


@dataclass(frozen=True)
class HEKitFacts:
    """What one kit's hospital_fl_he.json says.

    Attributes:
        role: "server" or "client".
        key_id: the hospitals' key id (64 hex digits).
        hospitals: hospitals in the consortium when the kit was made (client kits; None for the server).
        min_aggregate_sites: the site's policy (client kits; None for the server).
    """

    role: str
    key_id: str
    hospitals: int | None = None
    min_aggregate_sites: int | None = None

    @property
    def required_sites(self) -> int:
        """Sites an aggregate must sum before this hospital decrypts it: min(policy, consortium)."""
        if self.role != "client":
            raise InputError(
                "HE kit facts", self.role, "only a hospital kit has an aggregate minimum", "read a client kit"
            )
        return min(self.min_aggregate_sites, self.hospitals)

    def to_json(self) -> dict:
        out = {"role": self.role, "key_id": self.key_id}
        if self.role == "client":
            out |= {"hospitals": self.hospitals, "min_aggregate_sites": self.min_aggregate_sites}
        return out


def facts_from_json(data: object, source: str = HE_KIT_FILE) -> HEKitFacts:
    """The facts a hospital_fl_he.json holds; InputError naming the field otherwise."""
    if not isinstance(data, Mapping):
        raise InputError(source, type(data).__name__, "it must be a JSON object", _REPROVISION)
    role = data.get("role")
    keys = {"server": {"role", "key_id"}, "client": {"role", "key_id", "hospitals", "min_aggregate_sites"}}
    if role not in keys:
        raise InputError(f"{source}: role", role, "it must be server or client", _REPROVISION)
    if set(data) != keys[role]:
        rule = f"a {role} kit's file has exactly the keys {sorted(keys[role])}"
        raise InputError(source, sorted(data), rule, _REPROVISION)
    if not isinstance(data["key_id"], str) or not _KEY_ID.match(data["key_id"]):
        raise InputError(f"{source}: key_id", data["key_id"], "it must be 64 lowercase hex digits", _REPROVISION)
    if role == "server":
        return HEKitFacts("server", data["key_id"])
    for name, low in (("hospitals", 1), ("min_aggregate_sites", 2)):
        value = data[name]
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise InputError(f"{source}: {name}", value, f"it must be an integer >= {low}", _REPROVISION)
    return HEKitFacts("client", data["key_id"], data["hospitals"], data["min_aggregate_sites"])


def read_kit_facts(path: str | Path) -> HEKitFacts | None:
    """The facts of a kit file, None when the file does not exist (kits of a POC system)."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InputError(str(path), "unreadable", f"it must be JSON ({err})", _REPROVISION) from None
    return facts_from_json(data, str(path))


def write_kit_facts(path: str | Path, facts: HEKitFacts) -> None:
    """Write one kit's hospital_fl_he.json (not a secret: the key id is a one-way hash)."""
    facts_from_json(facts.to_json())  # the same rules the reader applies
    Path(path).write_text(json.dumps(facts.to_json(), indent=2) + "\n")


def provision_kit_facts(
    server_kit: Path | None, hospital_kits: Mapping[str, tuple[Path, int]], hospitals: int
) -> str | None:
    """Write hospital_fl_he.json into the server's and every hospital's startup folder.

    Args:
        server_kit: the server's startup folder (None when the project has no server here).
        hospital_kits: per hospital, (its startup folder, its min_aggregate_sites).
        hospitals: hospitals in the whole consortium (more than this run's when one is added).

    Returns:
        The key id, or None when the kits carry no client_context.tenseal (HE off): nothing written.
    """
    contexts = [kit / _CLIENT_CONTEXT for kit, _ in hospital_kits.values() if (kit / _CLIENT_CONTEXT).is_file()]
    if not contexts:
        return None
    from hospital_fl.privacy import he  # TenSEAL only where HE is on

    key_id = he.context_fingerprint(he.load_context(contexts[0], role="client"))
    if server_kit is not None:
        write_kit_facts(Path(server_kit) / HE_KIT_FILE, HEKitFacts("server", key_id))
    for kit, min_sites in hospital_kits.values():
        write_kit_facts(Path(kit) / HE_KIT_FILE, HEKitFacts("client", key_id, hospitals, min_sites))
    return key_id
