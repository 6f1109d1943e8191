"""API key tokens: `tf-<key_id>-<secret>`, of which the ledger stores only a salted hash.

The secret is 256 random bits, so nobody can guess it and a slow password hash (bcrypt,
argon2) would buy nothing: a fast keyed hash (HMAC-SHA256) already makes a stolen ledger
useless for logging in, and keeps verification cheap on every request.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets

from factory.metering.schema import KEY_SQL, KeyInfo, LedgerError, key_from, to_text, utcnow

PREFIX = "tf-"
_TOKEN = re.compile(r"tf-([0-9a-f]{12})-([A-Za-z0-9_-]{20,100})")
_KEY_ID = re.compile(r"[0-9a-f]{12}")


def new_key_id() -> str:
    return secrets.token_hex(6)


def new_secret() -> str:
    return secrets.token_urlsafe(32)


def new_salt() -> bytes:
    return secrets.token_bytes(16)


def format_token(key_id: str, secret: str) -> str:
    return f"{PREFIX}{key_id}-{secret}"


def parse_token(token: str) -> tuple[str, str] | None:
    """(key_id, secret), or None if `token` is not shaped like one of ours."""
    match = _TOKEN.fullmatch(token) if isinstance(token, str) else None
    return (match[1], match[2]) if match else None


def is_key_id(text: str) -> bool:
    return bool(_KEY_ID.fullmatch(text))


def hash_secret(salt: bytes, secret: str) -> str:
    return hmac.new(salt, secret.encode(), hashlib.sha256).hexdigest()


def secret_matches(salt: bytes, secret: str, hash_hex: str) -> bool:
    # Constant time, so response timing does not reveal how much of a guessed hash matched.
    return hmac.compare_digest(hash_secret(salt, secret), hash_hex)


# -- the api_keys table (called inside a Ledger transaction) -------------------------------


def insert(db, tenant_id: int | None, label: str) -> tuple[KeyInfo, str]:
    """A new key for `tenant_id` (None: an admin key); returns (info, token)."""
    if not isinstance(label, str) or len(label) > 200:
        raise LedgerError("key label must be text of at most 200 characters")
    secret, salt = new_secret(), new_salt()
    key_id = new_key_id()
    while db.execute("SELECT 1 FROM api_keys WHERE key_id = :key_id", key_id=key_id).fetchone():
        key_id = new_key_id()  # 48-bit ids: a collision is rare, not impossible
    db.execute(
        "INSERT INTO api_keys (key_id, tenant_id, admin, label, salt_hex, hash_hex, created_at)"
        " VALUES (:key_id, :tenant_id, :admin, :label, :salt_hex, :hash_hex, :now)",
        key_id=key_id, tenant_id=tenant_id, admin=int(tenant_id is None), label=label, salt_hex=salt.hex(),
        hash_hex=hash_secret(salt, secret), now=to_text(utcnow()),
    )  # fmt: skip
    info = key_from(db.execute(KEY_SQL + " WHERE k.key_id = :key_id", key_id=key_id).fetchone())
    return info, format_token(key_id, secret)


def verify(db, token: str) -> KeyInfo | None:
    """The live key `token` names, if its secret is right; None for anything else."""
    parsed = parse_token(token)
    if parsed is None:
        return None
    key_id, secret = parsed
    row = db.execute(KEY_SQL + " WHERE k.key_id = :key_id", key_id=key_id).fetchone()
    if row is None or row[5] is not None or not secret_matches(bytes.fromhex(row[6]), secret, row[7]):
        return None
    return key_from(row)


def revoke(db, key_id: str) -> bool:
    cur = db.execute(
        "UPDATE api_keys SET revoked_at = :now WHERE key_id = :key_id AND revoked_at IS NULL",
        now=to_text(utcnow()), key_id=key_id,
    )  # fmt: skip
    return cur.rowcount == 1


def select(db, tenant_id: int | None) -> list[KeyInfo]:
    """All keys, or only `tenant_id`'s; oldest first."""
    where, params = ("", {}) if tenant_id is None else (" WHERE k.tenant_id = :tenant_id", {"tenant_id": tenant_id})
    return [key_from(r) for r in db.execute(KEY_SQL + where + " ORDER BY k.created_at, k.key_id", **params)]
