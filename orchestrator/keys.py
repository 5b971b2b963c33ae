"""SSH client keys: generation, import, encrypted storage and assignment to workers.

Private keys are stored in the ``ssh_keys`` table encrypted with AES-256-GCM.
The 256-bit master key never enters the database: it comes from the
JOBBALANCER_MASTER_KEY environment variable or from ``master.key`` in the data
folder, which the first start creates with mode 0600.
"""

import base64
import binascii
import logging
import os
import re
import secrets
import stat
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import asyncssh
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.serialization import load_ssh_public_key
from sqlalchemy import Connection, Engine, delete, insert, or_, select, update

from orchestrator import models
from orchestrator.exceptions import (
    ConflictError,
    InvalidInputError,
    JobBalancerError,
    NotFoundError,
)
from orchestrator.timeutil import as_utc, isoformat, utcnow

logger = logging.getLogger(__name__)

MASTER_KEY_ENV = "JOBBALANCER_MASTER_KEY"
MASTER_KEY_FILE = "master.key"
MASTER_KEY_BYTES = 32
NONCE_BYTES = 12
# Stored blobs start with this version tag, so a later format can be detected.
CIPHERTEXT_TAG = b"jbk1"
KEY_TYPES = {"ed25519": "ssh-ed25519", "rsa": "ssh-rsa"}
RSA_GENERATED_BITS = 4096
RSA_MIN_BITS = 2048
# Key types OpenSSH 8.8 and later still accept for user authentication.
IMPORTABLE_ALGORITHMS = (
    "ssh-ed25519",
    "ssh-rsa",
    "ecdsa-sha2-nistp256",
    "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521",
)
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
# Path segments of the key routes that a key name would shadow.
RESERVED_NAMES = ("import", "rotations")
MAX_IMPORT_BYTES = 64 * 1024


class KeyStoreError(JobBalancerError):
    """The master key or a stored private key cannot be used."""

    status_code = 500
    error = "key_store_error"


class PassphraseRequiredError(InvalidInputError):
    """The imported private key is encrypted and no passphrase was given."""


@dataclass(frozen=True)
class KeyRecord:
    """One stored key pair, without its private half."""

    id: int
    name: str
    key_type: str
    public_key: str
    fingerprint: str
    is_default: bool
    created_at: datetime | None

    def bits(self) -> int | None:
        """Return the RSA modulus size, or None for other key types."""
        if self.key_type != "ssh-rsa":
            return None
        key: Any = load_ssh_public_key(self.public_key.encode())
        return int(key.key_size)

    def public(self, workers: list[str] | None = None) -> dict[str, Any]:
        """Build the JSON form of the key."""
        body: dict[str, Any] = {
            "id": self.id,
            "name": self.name,
            "type": self.key_type,
            "bits": self.bits(),
            "public_key": self.public_key,
            "fingerprint": self.fingerprint,
            "default": self.is_default,
            "created_at": isoformat(self.created_at),
        }
        if workers is not None:
            body["workers"] = workers
        return body


@dataclass(frozen=True)
class KeyUser:
    """A worker that logs in with a key, directly or as the default key."""

    worker_id: int
    name: str
    # "assigned" when workers.key_id names the key, "default" when the worker
    # has neither key_id nor key_path and the key is the default one.
    via: str


# Master key


def load_master_key(data_dir: Path, *, create: bool = True) -> bytes:
    """Return the master key from the environment or ``data_dir/master.key``.

    Creates the file with a random key and mode 0600 when it is missing and
    ``create`` is true. Raises KeyStoreError when the key is missing or invalid.
    """
    text = os.environ.get(MASTER_KEY_ENV, "").strip()
    if text:
        return _decode_master_key(text, MASTER_KEY_ENV)
    path = data_dir / MASTER_KEY_FILE
    if not path.exists():
        if not create:
            raise KeyStoreError(
                f"master key file {path} is missing: start the server once to "
                f"create it, or set {MASTER_KEY_ENV}"
            )
        _create_master_key_file(path)
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        logger.warning(
            "Master key file %s has mode %o: run chmod 600 on it",
            path,
            mode,
            extra={"event": "master_key_mode"},
        )
    return _decode_master_key(path.read_text(), str(path))


def generate_master_key_text() -> str:
    """Return a new random master key in the text form the file and variable use."""
    return base64.urlsafe_b64encode(secrets.token_bytes(MASTER_KEY_BYTES)).decode()


def _create_master_key_file(path: Path) -> None:
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        # Another process created it first; its key is the one to use.
        return
    with os.fdopen(fd, "w") as handle:
        handle.write(generate_master_key_text() + "\n")
    logger.info(
        "Created master key file %s: back it up, because stored SSH keys "
        "cannot be decrypted without it",
        path,
        extra={"event": "master_key_created"},
    )


def _decode_master_key(text: str, source: str) -> bytes:
    # Accept both base64 alphabets, so `openssl rand -base64 32` works too.
    cleaned = text.strip().replace("-", "+").replace("_", "/")
    cleaned += "=" * (-len(cleaned) % 4)
    try:
        key = base64.b64decode(cleaned, validate=True)
    except (binascii.Error, ValueError):
        key = b""
    if len(key) != MASTER_KEY_BYTES:
        raise KeyStoreError(
            f"invalid master key in {source}: expected {MASTER_KEY_BYTES} random "
            "bytes in base64, for example the output of `openssl rand -base64 32`"
        )
    return key


# Encryption


def encrypt_private_key(master_key: bytes, fingerprint: str, private: bytes) -> bytes:
    """Encrypt an OpenSSH private key; the fingerprint binds it to its public key."""
    nonce = secrets.token_bytes(NONCE_BYTES)
    sealed = AESGCM(master_key).encrypt(nonce, private, _associated_data(fingerprint))
    return CIPHERTEXT_TAG + nonce + sealed


def decrypt_private_key(master_key: bytes, fingerprint: str, blob: bytes) -> bytes:
    """Decrypt a stored private key; raise KeyStoreError when it does not open."""
    blob = bytes(blob)
    if not blob.startswith(CIPHERTEXT_TAG):
        raise KeyStoreError(f"stored key {fingerprint} has an unknown format")
    nonce = blob[len(CIPHERTEXT_TAG) : len(CIPHERTEXT_TAG) + NONCE_BYTES]
    sealed = blob[len(CIPHERTEXT_TAG) + NONCE_BYTES :]
    try:
        return AESGCM(master_key).decrypt(nonce, sealed, _associated_data(fingerprint))
    except InvalidTag as exc:
        raise KeyStoreError(
            f"cannot decrypt stored key {fingerprint}: the master key differs "
            "from the one it was stored with, or the row was altered"
        ) from exc


def _associated_data(fingerprint: str) -> bytes:
    return b"jobbalancer-ssh-key:" + fingerprint.encode()


# Creating keys


def generate_key(
    engine: Engine,
    master_key: bytes,
    name: str,
    key_type: str = "ed25519",
    *,
    make_default: bool | None = None,
) -> KeyRecord:
    """Generate a key pair and store it.

    ``make_default`` None makes the key the default one only when no default
    key exists yet.
    """
    validate_name(name)
    algorithm = KEY_TYPES.get(key_type)
    if algorithm is None:
        raise InvalidInputError(
            f"unknown key type {key_type!r}: use one of {', '.join(KEY_TYPES)}",
            field="type",
        )
    _ensure_name_free(engine, name)
    options: dict[str, Any] = {"comment": f"jobbalancer-{name}"}
    if algorithm == "ssh-rsa":
        options["key_size"] = RSA_GENERATED_BITS
    key = asyncssh.generate_private_key(algorithm, **options)
    record = _store_key(engine, master_key, name, key, make_default)
    logger.info(
        "Generated %s key %s (%s)",
        record.key_type,
        name,
        record.fingerprint,
        extra={"event": "ssh_key_generated", "key": name},
    )
    return record


def import_key(
    engine: Engine,
    master_key: bytes,
    name: str,
    data: bytes | str,
    passphrase: str | None = None,
    *,
    make_default: bool | None = None,
) -> KeyRecord:
    """Import a private key in OpenSSH, PKCS#1 or PKCS#8 PEM format and store it."""
    validate_name(name)
    raw = data.encode() if isinstance(data, str) else bytes(data)
    if len(raw) > MAX_IMPORT_BYTES:
        raise InvalidInputError(
            f"the key file is larger than {MAX_IMPORT_BYTES} bytes: "
            "send one private key",
            field="private_key",
        )
    _ensure_name_free(engine, name)
    key = _parse_private_key(raw, passphrase or None)
    _check_importable(key)
    if not key.get_comment():
        key.set_comment(f"jobbalancer-{name}")
    record = _store_key(engine, master_key, name, key, make_default)
    logger.info(
        "Imported %s key %s (%s)",
        record.key_type,
        name,
        record.fingerprint,
        extra={"event": "ssh_key_imported", "key": name},
    )
    return record


def _parse_private_key(raw: bytes, passphrase: str | None) -> asyncssh.SSHKey:
    try:
        return asyncssh.import_private_key(raw, passphrase)
    except (asyncssh.KeyImportError, asyncssh.KeyEncryptionError) as exc:
        message = str(exc)
        if passphrase is None and "assphrase must be specified" in message:
            raise PassphraseRequiredError(
                "the private key is encrypted: give its passphrase",
                field="passphrase",
            ) from exc
        wrong = "ncorrect passphrase" in message or "nable to decrypt" in message
        if passphrase is not None and _is_encrypted(raw) and wrong:
            raise InvalidInputError(
                f"the passphrase does not decrypt the private key ({message})",
                field="passphrase",
            ) from exc
        raise InvalidInputError(
            f"not a private key in OpenSSH or PEM format: {message}",
            field="private_key",
        ) from exc


def _is_encrypted(raw: bytes) -> bool:
    # PEM marks encryption in its header; OpenSSH keys name their cipher,
    # which is "none" for unencrypted keys.
    if b"ENCRYPTED" in raw:
        return True
    if b"BEGIN OPENSSH PRIVATE KEY" not in raw:
        return False
    body = b"".join(
        line.strip() for line in raw.splitlines() if line and b"-----" not in line
    )
    try:
        decoded = base64.b64decode(body)
    except (binascii.Error, ValueError):
        return False
    return not decoded[15:].startswith(b"\x00\x00\x00\x04none")


def _check_importable(key: asyncssh.SSHKey) -> None:
    algorithm = key.get_algorithm()
    if algorithm not in IMPORTABLE_ALGORITHMS:
        raise InvalidInputError(
            f"key type {algorithm} is not accepted: use Ed25519, ECDSA or RSA",
            field="private_key",
        )
    if algorithm == "ssh-rsa":
        public: Any = load_ssh_public_key(key.export_public_key("openssh"))
        if public.key_size < RSA_MIN_BITS:
            raise InvalidInputError(
                f"the RSA key has {public.key_size} bits: use at least "
                f"{RSA_MIN_BITS}, or generate an Ed25519 key",
                field="private_key",
            )


def _store_key(
    engine: Engine,
    master_key: bytes,
    name: str,
    key: asyncssh.SSHKey,
    make_default: bool | None,
) -> KeyRecord:
    public_key = key.export_public_key("openssh").decode().strip()
    fingerprint = key.get_fingerprint("sha256")
    private = key.export_private_key("openssh")
    sealed = encrypt_private_key(master_key, fingerprint, private)
    with engine.begin() as conn:
        if _name_taken(conn, name):
            raise ConflictError(f"SSH key {name!r} already exists", field="name")
        has_default = _default_row(conn) is not None
        is_default = make_default if make_default is not None else not has_default
        if is_default:
            conn.execute(update(models.ssh_keys).values(is_default=False))
        conn.execute(
            insert(models.ssh_keys).values(
                name=name,
                key_type=key.get_algorithm(),
                public_key=public_key,
                fingerprint=fingerprint,
                private_key_encrypted=sealed,
                is_default=is_default,
                created_at=utcnow(),
            )
        )
    return get_key(engine, name)


def validate_name(name: str) -> None:
    """Check that a key name is 1 to 64 letters, digits, '.', '_' or '-'."""
    if not NAME_PATTERN.fullmatch(name or "") or name in RESERVED_NAMES:
        raise InvalidInputError(
            f"invalid key name {name!r}: use 1 to 64 letters, digits, '.', '_' "
            "or '-', starting with a letter or digit, other than "
            f"{' or '.join(RESERVED_NAMES)}",
            field="name",
        )


def _ensure_name_free(engine: Engine, name: str) -> None:
    with engine.connect() as conn:
        if _name_taken(conn, name):
            raise ConflictError(f"SSH key {name!r} already exists", field="name")


def _name_taken(conn: Connection, name: str) -> bool:
    k = models.ssh_keys
    return conn.execute(select(k.c.id).where(k.c.name == name)).first() is not None


# Reading keys


def _record(row: Any) -> KeyRecord:
    return KeyRecord(
        id=int(row.id),
        name=row.name,
        key_type=row.key_type,
        public_key=row.public_key,
        fingerprint=row.fingerprint,
        is_default=bool(row.is_default),
        created_at=as_utc(row.created_at),
    )


def _public_columns() -> Any:
    k = models.ssh_keys
    return select(
        k.c.id,
        k.c.name,
        k.c.key_type,
        k.c.public_key,
        k.c.fingerprint,
        k.c.is_default,
        k.c.created_at,
    )


def list_keys(engine: Engine) -> list[KeyRecord]:
    """Return every stored key ordered by name."""
    with engine.connect() as conn:
        rows = conn.execute(_public_columns().order_by(models.ssh_keys.c.name)).all()
    return [_record(row) for row in rows]


def get_key(engine: Engine, name_or_id: str | int) -> KeyRecord:
    """Load a key by name or numeric id; raise NotFoundError when absent."""
    k = models.ssh_keys
    query = _public_columns()
    if isinstance(name_or_id, int):
        query = query.where(k.c.id == name_or_id)
    else:
        query = query.where(k.c.name == name_or_id)
    with engine.connect() as conn:
        row = conn.execute(query).first()
    if row is None:
        raise NotFoundError(
            f"SSH key {name_or_id!r} not found: see `jobbalancer key list`",
            field="key",
        )
    return _record(row)


def get_default_key(engine: Engine) -> KeyRecord | None:
    """Return the default key, or None when no key is the default."""
    with engine.connect() as conn:
        row = _default_row(conn)
    return _record(row) if row is not None else None


def _default_row(conn: Connection) -> Any:
    k = models.ssh_keys
    return conn.execute(
        _public_columns().where(k.c.is_default.is_(True)).order_by(k.c.id).limit(1)
    ).first()


def load_private_key(engine: Engine, master_key: bytes, key_id: int) -> asyncssh.SSHKey:
    """Decrypt a stored private key; raise KeyStoreError when that fails."""
    k = models.ssh_keys
    with engine.connect() as conn:
        row = conn.execute(
            select(k.c.name, k.c.fingerprint, k.c.private_key_encrypted).where(
                k.c.id == key_id
            )
        ).first()
    if row is None:
        raise KeyStoreError(f"SSH key id {key_id} no longer exists")
    private = decrypt_private_key(
        master_key, row.fingerprint, row.private_key_encrypted
    )
    key = asyncssh.import_private_key(private)
    if key.get_fingerprint("sha256") != row.fingerprint:
        raise KeyStoreError(f"stored key {row.name} does not match its fingerprint")
    return key


# Assignment to workers


def key_users(engine: Engine, key: KeyRecord) -> list[KeyUser]:
    """Return the SSH workers that log in with ``key``."""
    w = models.workers
    query = select(w.c.id, w.c.name, w.c.key_id, w.c.key_path).where(
        w.c.transport == "ssh"
    )
    with engine.connect() as conn:
        rows = conn.execute(query.order_by(w.c.name)).all()
    users = []
    for row in rows:
        if row.key_id == key.id:
            users.append(KeyUser(row.id, row.name, "assigned"))
        elif key.is_default and row.key_id is None and not row.key_path:
            users.append(KeyUser(row.id, row.name, "default"))
    return users


def set_default_key(engine: Engine, name: str) -> KeyRecord:
    """Make ``name`` the key of every worker without its own key."""
    key = get_key(engine, name)
    k = models.ssh_keys
    with engine.begin() as conn:
        conn.execute(update(k).where(k.c.id != key.id).values(is_default=False))
        conn.execute(update(k).where(k.c.id == key.id).values(is_default=True))
    logger.info(
        "SSH key %s is now the default key",
        name,
        extra={"event": "ssh_key_default", "key": name},
    )
    return get_key(engine, name)


def assign_key(engine: Engine, worker_name: str, key_name: str | None) -> None:
    """Give a worker its own key, or None to fall back to the default key."""
    w = models.workers
    key_id = get_key(engine, key_name).id if key_name is not None else None
    with engine.begin() as conn:
        row = conn.execute(
            select(w.c.id, w.c.transport).where(w.c.name == worker_name)
        ).first()
        if row is None:
            raise NotFoundError(f"worker {worker_name!r} not found", field="worker")
        if row.transport != "ssh" and key_id is not None:
            raise InvalidInputError(
                f"worker {worker_name!r} uses the {row.transport} transport, "
                "which needs no SSH key",
                field="worker",
            )
        values: dict[str, Any] = {"key_id": key_id, "updated_at": utcnow()}
        if key_id is not None:
            # A stored key replaces a key file, so only one of them applies.
            values["key_path"] = None
        conn.execute(update(w).where(w.c.id == row.id).values(**values))
    logger.info(
        "Worker %s now logs in with %s",
        worker_name,
        f"key {key_name}" if key_name else "the default key",
        extra={"event": "worker_key_assigned", "worker": worker_name},
    )


def delete_key(engine: Engine, name: str) -> None:
    """Delete a key; raise ConflictError while any worker logs in with it."""
    key = get_key(engine, name)
    users = key_users(engine, key)
    if users:
        names = ", ".join(user.name for user in users)
        raise ConflictError(
            f"SSH key {name!r} is in use by {len(users)} worker(s): {names}; "
            "assign them another key or rotate this one first"
        )
    with engine.begin() as conn:
        conn.execute(delete(models.ssh_keys).where(models.ssh_keys.c.id == key.id))
    logger.info(
        "Deleted SSH key %s (%s)",
        name,
        key.fingerprint,
        extra={"event": "ssh_key_deleted", "key": name},
    )


# Host keys


def host_key_state(engine: Engine, worker_name: str) -> dict[str, Any]:
    """Return a worker's recorded and pending host keys with their fingerprints."""
    w = models.workers
    with engine.connect() as conn:
        row = conn.execute(
            select(w.c.name, w.c.host_key, w.c.pending_host_key).where(
                w.c.name == worker_name
            )
        ).first()
    if row is None:
        raise NotFoundError(f"worker {worker_name!r} not found", field="worker")
    return {
        "worker": row.name,
        "host_key": row.host_key,
        "fingerprint": public_key_fingerprint(row.host_key),
        "pending_host_key": row.pending_host_key,
        "pending_fingerprint": public_key_fingerprint(row.pending_host_key),
    }


def record_pending_host_key(engine: Engine, worker_id: int, host_key: str) -> None:
    """Store a changed host key until an admin accepts it.

    A key equal to the recorded one is skipped: it comes from a check that
    started before an admin accepted that key.
    """
    w = models.workers
    with engine.begin() as conn:
        conn.execute(
            update(w)
            .where(w.c.id == worker_id)
            .where(or_(w.c.host_key.is_(None), w.c.host_key != host_key))
            .values(pending_host_key=host_key)
        )


def accept_host_key(
    engine: Engine, worker_name: str, fingerprint: str | None = None
) -> dict[str, Any]:
    """Trust a worker's pending host key in place of the recorded one.

    When ``fingerprint`` is given it must match the pending key, so an admin
    accepts exactly the key they were shown.
    """
    state = host_key_state(engine, worker_name)
    pending = state["pending_host_key"]
    if not pending:
        raise ConflictError(f"worker {worker_name!r} has no pending host key to accept")
    if fingerprint and fingerprint != state["pending_fingerprint"]:
        raise ConflictError(
            f"the pending host key of {worker_name!r} is "
            f"{state['pending_fingerprint']}, not {fingerprint}: check the "
            "worker again before accepting",
            field="fingerprint",
        )
    w = models.workers
    with engine.begin() as conn:
        conn.execute(
            update(w)
            .where(w.c.name == worker_name, w.c.pending_host_key == pending)
            .values(host_key=pending, pending_host_key=None, updated_at=utcnow())
        )
    logger.warning(
        "Accepted new host key %s of worker %s (was %s)",
        state["pending_fingerprint"],
        worker_name,
        state["fingerprint"],
        extra={"event": "host_key_accepted", "worker": worker_name},
    )
    return host_key_state(engine, worker_name)


def public_key_fingerprint(public_key_line: str | None) -> str | None:
    """Return the SHA256 fingerprint of an OpenSSH public key line, or None."""
    if not public_key_line:
        return None
    try:
        return asyncssh.import_public_key(public_key_line).get_fingerprint("sha256")
    except (ValueError, asyncssh.KeyImportError):
        return None
