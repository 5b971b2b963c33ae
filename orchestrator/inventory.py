"""Read and write worker inventories in Ansible's YAML inventory format.

Groups are worker classes and hosts are SSH workers. A host's variables are
resolved as Ansible resolves them: ``all`` first, then its groups from the
shallowest to the deepest (ties by ``ansible_group_priority``, then by name),
then the host's own variables. The server reads:

- ``ansible_host`` (default: the host name), ``ansible_port`` (default 22) and
  ``ansible_user``;
- ``jobbalancer_user``: the job account, which wins over ``ansible_user``, so
  Ansible can log in as an administrator while jobs run as another account;
- ``jobbalancer_max_jobs`` (on a group: the class default; on a host: the
  worker's own limit) and ``jobbalancer_max_sessions`` (default 10);
- ``jobbalancer_key`` (a stored key name) or ``jobbalancer_key_file`` (a key
  file on the server); when neither is set, the worker's key stays as it is;
- ``jobbalancer_class``: the class of a host listed in several groups.
"""

import logging
import re
import string
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import yaml  # type: ignore[import-untyped]  # PyYAML ships no type hints
from sqlalchemy import Connection, Engine, insert, select, update

from orchestrator import keys, models, workers
from orchestrator.exceptions import InvalidInputError
from orchestrator.timeutil import utcnow

logger = logging.getLogger(__name__)

DEFAULT_SSH_PORT = 22
DEFAULT_MAX_SESSIONS = 10
# Groups that Ansible creates itself; they are never worker classes.
IMPLICIT_GROUPS = ("all", "ungrouped")
RANGE_PATTERN = re.compile(r"\[([0-9]+|[a-z]):([0-9]+|[a-z])(?::([0-9]+))?\]")


class InventoryError(InvalidInputError):
    """The inventory file cannot be read or names invalid values."""


@dataclass
class WorkerSpec:
    """A worker as an inventory file describes it."""

    name: str
    worker_class: str
    host: str
    port: int
    username: str
    max_jobs: int | None
    max_sessions: int
    # None when the file sets neither jobbalancer_key nor jobbalancer_key_file.
    key_name: str | None = None
    key_file: str | None = None

    @property
    def key_stated(self) -> bool:
        """Return whether the file names the key the worker logs in with."""
        return self.key_name is not None or self.key_file is not None


@dataclass
class Inventory:
    """Worker classes with their default max jobs, and workers, from one file."""

    # Class name to its default max jobs, None when the file does not set it.
    classes: dict[str, int | None] = field(default_factory=dict)
    workers: dict[str, WorkerSpec] = field(default_factory=dict)

    @classmethod
    def from_yaml(cls, text: str, source: str = "inventory") -> "Inventory":
        """Parse an Ansible YAML inventory; raise InventoryError on bad input."""
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise InventoryError(f"{source} is not valid YAML: {exc}") from exc
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise InventoryError(
                f"{source} must be a YAML mapping of group names, as in "
                "'all: {children: {...}}'"
            )
        groups = _GroupTree(source)
        if "all" in data:
            groups.add("all", data["all"], parent=None)
            extra = [name for name in data if name != "all"]
        else:
            groups.ensure("all")
            extra = list(data)
        for name in extra:
            groups.add(str(name), data[name], parent="all")
        return groups.build_inventory()


@dataclass
class _Group:
    name: str
    vars: dict[str, Any] = field(default_factory=dict)
    hosts: dict[str, dict[str, Any]] = field(default_factory=dict)
    parents: set[str] = field(default_factory=set)
    children: set[str] = field(default_factory=set)


class _GroupTree:
    """Groups read from the file; the same group may appear under several parents."""

    def __init__(self, source: str):
        self.source = source
        self.groups: dict[str, _Group] = {}

    def ensure(self, name: str) -> _Group:
        if name not in self.groups:
            self.groups[name] = _Group(name)
        return self.groups[name]

    def add(self, name: str, spec: Any, parent: str | None) -> None:
        group = self.ensure(name)
        if parent is not None:
            if name == parent or name in self._ancestors(parent):
                raise InventoryError(f"{self.source}: group {name!r} contains itself")
            group.parents.add(parent)
            self.groups[parent].children.add(name)
        if spec is None:
            return
        if not isinstance(spec, dict):
            raise InventoryError(
                f"{self.source}: group {name!r} must be a mapping with hosts, "
                "vars or children"
            )
        unknown = set(spec) - {"hosts", "vars", "children"}
        if unknown:
            raise InventoryError(
                f"{self.source}: group {name!r} has unknown keys "
                f"{', '.join(sorted(map(str, unknown)))}: use hosts, vars, children"
            )
        group.vars.update(self._mapping(spec.get("vars"), f"vars of group {name!r}"))
        hosts = self._mapping(spec.get("hosts"), f"hosts of group {name!r}")
        for pattern, host_vars in hosts.items():
            host_vars = self._mapping(host_vars, f"host {pattern!r}")
            for host in expand_host_pattern(str(pattern)):
                group.hosts.setdefault(host, {}).update(host_vars)
        children = self._mapping(spec.get("children"), f"children of group {name!r}")
        for child, child_spec in children.items():
            self.add(str(child), child_spec, parent=name)

    def _mapping(self, value: Any, what: str) -> dict[str, Any]:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise InventoryError(f"{self.source}: {what} must be a mapping")
        return {str(key): item for key, item in value.items()}

    def _ancestors(self, name: str) -> set[str]:
        seen: set[str] = set()
        pending = [name]
        while pending:
            for parent in self.groups.get(pending.pop(), _Group("")).parents:
                if parent not in seen:
                    seen.add(parent)
                    pending.append(parent)
        return seen

    def _depth(self, name: str) -> int:
        parents = self.groups[name].parents
        return 1 + max((self._depth(p) for p in parents), default=-1)

    def _resolve_group_vars(self, names: set[str]) -> dict[str, Any]:
        """Merge the vars of ``names`` and their ancestors in Ansible's order."""
        chain = set(names)
        for name in names:
            chain |= self._ancestors(name)

        def order(name: str) -> tuple[int, int, str]:
            group = self.groups[name]
            priority = int(group.vars.get("ansible_group_priority", 1))
            return (self._depth(name), priority, name)

        merged: dict[str, Any] = {}
        for name in sorted(chain, key=order):
            merged.update(self.groups[name].vars)
        return merged

    def build_inventory(self) -> Inventory:
        inventory = Inventory()
        memberships: dict[str, set[str]] = {}
        host_vars: dict[str, dict[str, Any]] = {}
        for group in self.groups.values():
            for host, values in group.hosts.items():
                memberships.setdefault(host, set()).add(group.name)
                host_vars.setdefault(host, {}).update(values)
            if group.name in IMPLICIT_GROUPS:
                continue
            # A group that contains only other groups is not a class.
            stated = "jobbalancer_max_jobs" in group.vars and not group.children
            if group.hosts or stated:
                inventory.classes[group.name] = self._class_max_jobs(group.name)
        for host in sorted(memberships):
            spec = self._worker_spec(
                host, memberships[host], host_vars[host], inventory.classes
            )
            inventory.workers[host] = spec
            if spec.worker_class not in inventory.classes:
                inventory.classes[spec.worker_class] = self._class_max_jobs("all")
        return inventory

    def _class_max_jobs(self, group: str) -> int | None:
        value = self._resolve_group_vars({group}).get("jobbalancer_max_jobs")
        where = f"{self.source}: group {group!r}"
        return _positive(value, "jobbalancer_max_jobs", where)

    def _worker_spec(
        self,
        host: str,
        groups: set[str],
        own_vars: dict[str, Any],
        class_defaults: dict[str, int | None],
    ) -> WorkerSpec:
        values = self._resolve_group_vars(groups | {"all"})
        values.update(own_vars)
        where = f"{self.source}: host {host!r}"
        worker_class = self._host_class(host, groups, values)

        if worker_class in class_defaults:
            class_default = class_defaults[worker_class]
        else:
            class_default = self._class_max_jobs("all")
        max_jobs = _positive(
            values.get("jobbalancer_max_jobs"), "jobbalancer_max_jobs", where
        )
        # A limit equal to the class default is stored as None, so the worker
        # follows later changes of the class default.
        if max_jobs is not None and max_jobs == class_default:
            max_jobs = None

        key_name = _text(values.get("jobbalancer_key"), "jobbalancer_key", where)
        key_file = _text(values.get("jobbalancer_key_file"), "key file", where)
        if key_name and key_file:
            raise InventoryError(
                f"{where} sets both jobbalancer_key and jobbalancer_key_file: keep one"
            )

        username = _text(values.get("jobbalancer_user"), "jobbalancer_user", where)
        if username is None:
            username = _text(values.get("ansible_user"), "ansible_user", where)
        port = values.get("ansible_port", DEFAULT_SSH_PORT)
        sessions = values.get("jobbalancer_max_sessions", DEFAULT_MAX_SESSIONS)
        return WorkerSpec(
            name=host,
            worker_class=worker_class,
            host=_text(values.get("ansible_host"), "ansible_host", where) or host,
            port=_port(port, where),
            username=username or "",
            max_jobs=max_jobs,
            max_sessions=_positive(sessions, "jobbalancer_max_sessions", where) or 1,
            key_name=key_name or None,
            key_file=key_file or None,
        )

    def _host_class(self, host: str, groups: set[str], values: dict[str, Any]) -> str:
        stated = _text(values.get("jobbalancer_class"), "jobbalancer_class", host)
        if stated:
            return stated
        candidates = sorted(groups - set(IMPLICIT_GROUPS))
        if not candidates:
            return workers.DEFAULT_CLASS
        if len(candidates) > 1:
            raise InventoryError(
                f"{self.source}: host {host!r} is listed in groups "
                f"{', '.join(candidates)}: set jobbalancer_class on it to choose "
                "its worker class"
            )
        return candidates[0]


def expand_host_pattern(pattern: str) -> list[str]:
    """Expand Ansible host ranges such as ``web[01:03]`` or ``db-[a:c]``."""
    match = RANGE_PATTERN.search(pattern)
    if match is None:
        return [pattern]
    start, end, stride_text = match.groups()
    stride = int(stride_text or 1)
    head, tail = pattern[: match.start()], pattern[match.end() :]
    if start.isdigit() and end.isdigit():
        width = len(start) if start.startswith("0") else 0
        items = [str(n).zfill(width) for n in range(int(start), int(end) + 1, stride)]
    elif start.isalpha() and end.isalpha():
        letters = string.ascii_lowercase
        items = list(letters[letters.index(start) : letters.index(end) + 1 : stride])
    else:
        raise InventoryError(f"invalid host range in {pattern!r}")
    if not items or stride < 1:
        raise InventoryError(f"empty host range in {pattern!r}")
    return [name for item in items for name in expand_host_pattern(head + item + tail)]


def _text(value: Any, what: str, where: str) -> str | None:
    if value is None:
        return None
    if isinstance(value, (dict, list)):
        raise InventoryError(f"{where}: {what} must be a string")
    text = str(value)
    if "{{" in text or "{%" in text:
        raise InventoryError(
            f"{where}: {what} is a Jinja2 template ({text!r}); the server cannot "
            "evaluate templates, so write the value itself"
        )
    return text


def _positive(value: Any, what: str, where: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not str(value).strip().isdigit() or int(value) < 1:
        raise InventoryError(f"{where}: {what} must be a whole number of at least 1")
    return int(value)


def _port(value: Any, where: str) -> int:
    port = _positive(value, "ansible_port", where) or DEFAULT_SSH_PORT
    if port > 65535:
        raise InventoryError(f"{where}: ansible_port must be at most 65535")
    return port


# Sync


@dataclass
class SyncReport:
    """Result of a sync: the classes and workers it added, changed and left alone."""

    dry_run: bool
    classes_added: list[str] = field(default_factory=list)
    classes_changed: dict[str, list[str]] = field(default_factory=dict)
    added: list[str] = field(default_factory=list)
    changed: dict[str, list[str]] = field(default_factory=dict)
    unchanged: list[str] = field(default_factory=list)
    # Workers on the server that the file does not list; sync never removes them.
    not_in_file: list[str] = field(default_factory=list)

    def public(self) -> dict[str, Any]:
        """Build the JSON form of the report."""
        return {
            "dry_run": self.dry_run,
            "classes_added": self.classes_added,
            "classes_changed": self.classes_changed,
            "added": self.added,
            "changed": self.changed,
            "unchanged": self.unchanged,
            "not_in_file": self.not_in_file,
        }

    def lines(self) -> list[str]:
        """Return the report as lines of text for the command line."""
        prefix = "would " if self.dry_run else ""
        out = [f"{prefix}add class {name}" for name in self.classes_added]
        for name, changes in self.classes_changed.items():
            out.append(f"{prefix}change class {name}: {'; '.join(changes)}")
        out += [f"{prefix}add worker {name}" for name in self.added]
        for name, changes in self.changed.items():
            out.append(f"{prefix}change worker {name}: {'; '.join(changes)}")
        out += [f"unchanged worker {name}" for name in self.unchanged]
        out += [f"not in file, left alone: worker {n}" for n in self.not_in_file]
        out.append(
            f"{len(self.added)} added, {len(self.changed)} changed, "
            f"{len(self.unchanged)} unchanged, {len(self.not_in_file)} not in file"
            + (" (dry run, nothing was written)" if self.dry_run else "")
        )
        return out


def sync_inventory(
    engine: Engine, inventory: Inventory, *, dry_run: bool = False
) -> SyncReport:
    """Create and update classes and workers so they match ``inventory``.

    Workers missing from the file stay as they are. Running the same file twice
    changes nothing the second time.
    """
    report = SyncReport(dry_run=dry_run)
    with engine.begin() as conn:
        key_ids = _key_ids(conn, inventory)
        class_ids = _sync_classes(conn, inventory, report)
        existing = _existing_workers(conn)
        for spec in inventory.workers.values():
            _sync_worker(conn, spec, existing, class_ids, key_ids, report)
        listed = set(inventory.workers)
        report.not_in_file = sorted(
            name
            for name, row in existing.items()
            if name not in listed and row.transport == "ssh"
        )
        if dry_run:
            conn.rollback()
    if not dry_run:
        logger.info(
            "Synced inventory: %d added, %d changed, %d unchanged",
            len(report.added),
            len(report.changed),
            len(report.unchanged),
            extra={"event": "inventory_synced"},
        )
    return report


def _key_ids(conn: Connection, inventory: Inventory) -> dict[str, int]:
    k = models.ssh_keys
    names = {s.key_name for s in inventory.workers.values() if s.key_name}
    rows = conn.execute(select(k.c.id, k.c.name).where(k.c.name.in_(names))).all()
    found = {row.name: int(row.id) for row in rows}
    missing = sorted(names - set(found))
    if missing:
        raise InventoryError(
            f"unknown SSH key(s) in jobbalancer_key: {', '.join(missing)}; create "
            "them with `jobbalancer key generate NAME` first"
        )
    return found


def _sync_classes(
    conn: Connection, inventory: Inventory, report: SyncReport
) -> dict[str, int]:
    c = models.worker_classes
    rows = {row.name: row for row in conn.execute(select(c)).all()}
    ids: dict[str, int] = {}
    for name, max_jobs in sorted(inventory.classes.items()):
        if len(name) > 64:
            raise InventoryError(f"group name {name!r} is longer than 64 characters")
        row = rows.get(name)
        if row is None:
            default = max_jobs or workers.DEFAULT_MAX_JOBS
            ids[name] = workers.ensure_class(conn, name, default)
            report.classes_added.append(name)
            continue
        ids[name] = int(row.id)
        if max_jobs is not None and max_jobs != row.default_max_jobs:
            conn.execute(
                update(c).where(c.c.id == row.id).values(default_max_jobs=max_jobs)
            )
            report.classes_changed[name] = [
                f"default max jobs {row.default_max_jobs} -> {max_jobs}"
            ]
    return ids


def _existing_workers(conn: Connection) -> dict[str, Any]:
    w, c = models.workers, models.worker_classes
    rows = conn.execute(
        select(w, c.c.name.label("class_name")).join(c, c.c.id == w.c.class_id)
    ).all()
    return {row.name: row for row in rows}


def _sync_worker(
    conn: Connection,
    spec: WorkerSpec,
    existing: dict[str, Any],
    class_ids: dict[str, int],
    key_ids: dict[str, int],
    report: SyncReport,
) -> None:
    values: dict[str, Any] = {
        "host": spec.host,
        "port": spec.port,
        "username": spec.username,
        "class_id": class_ids[spec.worker_class],
        "max_jobs": spec.max_jobs,
        "max_sessions": spec.max_sessions,
    }
    if spec.key_stated:
        values["key_id"] = key_ids[spec.key_name] if spec.key_name else None
        values["key_path"] = spec.key_file
    if len(spec.name) > 64:
        raise InventoryError(f"host name {spec.name!r} is longer than 64 characters")

    w = models.workers
    row = existing.get(spec.name)
    now = utcnow()
    if row is None:
        conn.execute(
            insert(w).values(
                name=spec.name,
                transport="ssh",
                enabled=True,
                draining=False,
                state="offline",
                reason="not checked yet",
                created_at=now,
                updated_at=now,
                **values,
            )
        )
        report.added.append(spec.name)
        return

    if row.transport != "ssh":
        raise InventoryError(
            f"host {spec.name!r} names a worker that uses the {row.transport} "
            "transport: rename the host in the inventory"
        )
    changes = _describe_changes(row, values, spec)
    if not changes:
        report.unchanged.append(spec.name)
        return
    conn.execute(update(w).where(w.c.id == row.id).values(updated_at=now, **values))
    report.changed[spec.name] = changes


def _describe_changes(row: Any, values: dict[str, Any], spec: WorkerSpec) -> list[str]:
    labels = {
        "host": "host",
        "port": "port",
        "username": "user",
        "max_jobs": "max jobs",
        "max_sessions": "max sessions",
        "key_id": "stored key id",
        "key_path": "key file",
    }
    changes = []
    for column, label in labels.items():
        if column in values and getattr(row, column) != values[column]:
            changes.append(f"{label} {getattr(row, column)!r} -> {values[column]!r}")
    if row.class_id != values["class_id"]:
        changes.append(f"class {row.class_name!r} -> {spec.worker_class!r}")
    return changes


# Export


def export_inventory(engine: Engine, now: datetime | None = None) -> str:
    """Write the server's SSH workers as an Ansible YAML inventory."""
    classes = workers.list_classes(engine)
    records = [r for r in workers.list_workers(engine) if r.transport == "ssh"]
    key_names = {record.id: record.name for record in keys.list_keys(engine)}
    children: dict[str, Any] = {}
    for item in classes:
        children[item["name"]] = {
            "vars": {"jobbalancer_max_jobs": item["default_max_jobs"]},
        }
    for record in records:
        group = children.setdefault(record.class_name, {})
        host: dict[str, Any] = {
            "ansible_host": record.host,
            "ansible_port": record.port,
        }
        if record.username:
            # Both names, so the file still names the job account when an
            # admin account for Ansible is given with -e ansible_user=...
            host["ansible_user"] = record.username
            host["jobbalancer_user"] = record.username
        if record.max_jobs != _class_default(classes, record.class_name):
            host["jobbalancer_max_jobs"] = record.max_jobs
        host["jobbalancer_max_sessions"] = record.max_sessions
        if record.key_id is not None and record.key_id in key_names:
            host["jobbalancer_key"] = key_names[record.key_id]
        elif record.key_path:
            host["jobbalancer_key_file"] = record.key_path
        group.setdefault("hosts", {})[record.name] = host
    stamp = (now or utcnow()).strftime("%Y-%m-%d %H:%M:%S UTC")
    header = (
        f"# Job Balancer workers, exported {stamp}.\n"
        "# Groups are worker classes. `jobbalancer inventory sync FILE` reads this\n"
        "# file back; the built-in local worker is not listed.\n"
    )
    body = str(
        yaml.safe_dump(
            {"all": {"children": children}}, sort_keys=False, default_flow_style=False
        )
    )
    return header + body


def _class_default(classes: list[dict[str, Any]], name: str) -> int | None:
    for item in classes:
        if item["name"] == name:
            return int(item["default_max_jobs"])
    return None
