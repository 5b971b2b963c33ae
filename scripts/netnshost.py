"""Run a test sshd host in its own network namespace, so a test can cut its network.

A NetnsHost is an SshHost whose sshd runs under `ip netns exec` in a new network
namespace. A veth pair joins that namespace to the caller's: the host end gets the
first address of a free /30 in 10.213.0.0/16 and the namespace end the second,
where sshd listens on port 22. cut() takes the namespace end down, so packets in
both directions are dropped without a reset, and restore() brings it back.

Namespaces are named `jbtest-<pid>-<n>` and host-side links `jbt<pid>h<n>`, so
leftovers are easy to recognise. close() removes only what this object created:
it stops sshd by PID, kills by PID the processes still in the namespace, such as
detached jobs, and deletes the veth pair and the namespace. An atexit handler
closes hosts that are still open when the interpreter exits.

Linux only, and it must run as root: `ip netns add` needs CAP_SYS_ADMIN.
"""

from __future__ import annotations

import atexit
import contextlib
import ipaddress
import itertools
import json
import logging
import os
import signal
import subprocess
import threading
from dataclasses import dataclass, field
from types import TracebackType

from testhost import SshHost, TestHostError

logger = logging.getLogger("netnshost")

IP_PATH = "ip"
NAMESPACE_PREFIX = "jbtest"
LINK_PREFIX = "jbt"
# Private (RFC 1918) space for the test links. Each host takes one /30 of it,
# configures only the two addresses inside, and the /30 route of its veth keeps
# traffic to them on that link.
TEST_NETWORK = ipaddress.IPv4Network("10.213.0.0/16")
NAMESPACE_SSH_PORT = 22
# Linux limits interface names to 15 bytes (IFNAMSIZ - 1).
MAX_LINK_NAME = 15
COMMAND_TIMEOUT = 10.0

_counter = itertools.count()
_open_hosts: set[NetnsHost] = set()
_open_hosts_lock = threading.Lock()


def _run_ip(*args: str) -> str:
    """Run `ip ARGS` and return its stdout. Raises TestHostError when it fails."""
    command = [IP_PATH, *args]
    try:
        result = subprocess.run(
            command,
            capture_output=True,
            text=True,
            timeout=COMMAND_TIMEOUT,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as error:
        raise TestHostError(f"{' '.join(command)} failed: {error}") from error
    if result.returncode != 0:
        raise TestHostError(
            f"{' '.join(command)} exited with status {result.returncode}: "
            f"{result.stderr.strip()}"
        )
    return result.stdout


def netns_unavailable_reason() -> str | None:
    """Return why network namespaces cannot be used here, or None when they can.

    Creates and deletes a probe namespace, because only a real `ip netns add`
    shows whether the kernel and the caller's privileges allow it.
    """
    if os.geteuid() != 0:
        return "network namespaces need root (CAP_SYS_ADMIN)"
    probe = f"{NAMESPACE_PREFIX}-{os.getpid()}-probe{next(_counter)}"
    try:
        _run_ip("netns", "add", probe)
    except TestHostError as error:
        return f"cannot create a network namespace: {error}"
    try:
        _run_ip("netns", "delete", probe)
    except TestHostError as error:
        return f"`ip netns delete` failed: {error}"
    return None


def _addresses_in_use() -> set[ipaddress.IPv4Address]:
    """Return the IPv4 addresses configured in the caller's network namespace."""
    addresses: set[ipaddress.IPv4Address] = set()
    for line in _run_ip("-4", "-o", "addr", "show").splitlines():
        words = line.split()
        if "inet" in words:
            interface = ipaddress.IPv4Interface(words[words.index("inet") + 1])
            addresses.add(interface.ip)
    return addresses


def _choose_subnet(seed: int) -> ipaddress.IPv4Network:
    """Return a /30 of TEST_NETWORK that no local interface has an address in."""
    in_use = _addresses_in_use()
    subnets = list(TEST_NETWORK.subnets(new_prefix=30))
    for offset in range(len(subnets)):
        subnet = subnets[(seed + offset) % len(subnets)]
        if not any(address in subnet for address in in_use):
            return subnet
    raise TestHostError(f"every /30 in {TEST_NETWORK} is in use")


def _link_address(link: str, namespace: str | None = None) -> str:
    """Return the MAC address of a link, in the given namespace if one is named."""
    prefix = ["-n", namespace] if namespace else []
    (info,) = json.loads(_run_ip(*prefix, "-j", "link", "show", "dev", link))
    return str(info["address"])


def _link_name(side: str, pid: int, index: int) -> str:
    name = f"{LINK_PREFIX}{pid}{side}{index}"
    if len(name) > MAX_LINK_NAME:
        name = f"{LINK_PREFIX}{pid % 100000}{side}{index % 10000}"
    return name


@dataclass(eq=False)
class NetnsHost(SshHost):
    """One sshd in a network namespace of its own, reached over a veth pair.

    `host` is the namespace's address. start() creates the namespace on its first
    call, and close() removes it, so a stopped host can be started again.
    """

    port: int = NAMESPACE_SSH_PORT
    namespace: str = field(default="", init=False)
    host_link: str = field(default="", init=False)
    namespace_link: str = field(default="", init=False)
    gateway: str = field(default="", init=False)
    is_cut: bool = field(default=False, init=False)
    _index: int = field(default=0, init=False, repr=False)
    _namespace_created: bool = field(default=False, init=False, repr=False)
    _link_created: bool = field(default=False, init=False, repr=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        pid = os.getpid()
        self._index = next(_counter)
        self.namespace = f"{NAMESPACE_PREFIX}-{pid}-{self._index}"
        self.host_link = _link_name("h", pid, self._index)
        self.namespace_link = _link_name("n", pid, self._index)

    def start(self) -> None:
        """Create the namespace and veth pair if needed, then start sshd in it.

        When the first start fails, everything it created is removed again.
        """
        if self._namespace_created:
            super().start()
            return
        try:
            self._create_network()
            super().start()
        except BaseException:
            self.close()
            raise

    def cut(self) -> None:
        """Take the namespace end of the link down, so TCP goes silent.

        Taking the host end down would delete the host's route to the namespace,
        and packets for it would follow the default route out of the machine. With
        the namespace end down, the host end loses its carrier and keeps the route,
        so it drops what it is sent, and the namespace has no route back.
        """
        _run_ip("-n", self.namespace, "link", "set", self.namespace_link, "down")
        self.is_cut = True
        route = _run_ip("route", "get", self.host)
        if f"dev {self.host_link} " not in route:
            self.restore()
            raise TestHostError(
                f"{self.name}: with the link cut, {self.host} is routed outside "
                f"{self.host_link} ({route.strip()}), so the cut was undone"
            )
        logger.info("%s: cut link %s", self.name, self.host_link)

    def restore(self) -> None:
        """Bring the namespace end of the link back up."""
        _run_ip("-n", self.namespace, "link", "set", self.namespace_link, "up")
        # Taking a link down flushes its permanent neighbor entries too.
        self._pin_neighbors()
        self.is_cut = False
        logger.info("%s: restored link %s", self.name, self.host_link)

    def close(self) -> None:
        """Stop sshd, kill what is left in the namespace, delete link and namespace.

        Each step runs even when an earlier one fails, and the first error is
        raised at the end.
        """
        errors: list[BaseException] = []
        steps = [
            self.stop,
            self._kill_namespace_processes,
            self._delete_link,
            self._delete_namespace,
        ]
        for step in steps:
            # A failed step must not keep the later ones from removing the rest.
            try:
                step()
            except Exception as error:
                logger.warning(
                    "%s: %s failed during close: %s", self.name, step.__name__, error
                )
                errors.append(error)
        with _open_hosts_lock:
            _open_hosts.discard(self)
        if errors:
            raise errors[0]

    def namespace_inode(self) -> int | None:
        """Return the inode of the namespace's network namespace file, or None."""
        try:
            return os.stat(f"/run/netns/{self.namespace}").st_ino
        except FileNotFoundError:
            return None

    def owns_process(self, pid: int) -> bool:
        """Return whether process `pid` runs in this host's network namespace."""
        inode = self.namespace_inode()
        if inode is None:
            return False
        try:
            return os.stat(f"/proc/{pid}/ns/net").st_ino == inode
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            return False

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def _write_known_hosts(self) -> None:
        # ssh looks up a host on port 22 by its bare address, without brackets.
        key_type, key_data = (
            self.host_key_path.with_suffix(".pub").read_text().split()[:2]
        )
        name = self.host if self.port == 22 else f"[{self.host}]:{self.port}"
        self.known_hosts_path.write_text(f"{name} {key_type} {key_data}\n")

    def _sshd_command(self) -> list[str]:
        # `ip netns exec` replaces itself with sshd by exec, so the PID stays sshd's.
        return [IP_PATH, "netns", "exec", self.namespace, *super()._sshd_command()]

    def _create_network(self) -> None:
        with _open_hosts_lock:
            _open_hosts.add(self)
        subnet = _choose_subnet(os.getpid() * 8 + self._index)
        gateway, address = list(subnet.hosts())
        namespace = self.namespace
        _run_ip("netns", "add", namespace)
        self._namespace_created = True
        veth = f"{self.host_link} type veth peer name {self.namespace_link}"
        _run_ip("link", "add", *veth.split(), "netns", namespace)
        self._link_created = True
        _run_ip("addr", "add", f"{gateway}/30", "dev", self.host_link)
        _run_ip("link", "set", self.host_link, "up")
        _run_ip(
            "-n", namespace, "addr", "add", f"{address}/30", "dev", self.namespace_link
        )
        _run_ip("-n", namespace, "link", "set", self.namespace_link, "up")
        _run_ip("-n", namespace, "link", "set", "lo", "up")
        self.gateway = str(gateway)
        self.host = str(address)
        self._pin_neighbors()
        logger.info(
            "%s: namespace %s at %s over %s",
            self.name,
            namespace,
            self.host,
            self.host_link,
        )

    def _pin_neighbors(self) -> None:
        """Add permanent ARP entries for both ends of the link.

        Without them, ARP resolution fails a few seconds into a cut, and then the
        kernel fails connects at once with "No route to host". A break further along
        a real path often gives no such signal, and with the entries a connect
        waits out its timeout as it would there.
        """
        host_mac = _link_address(self.host_link)
        namespace_mac = _link_address(self.namespace_link, self.namespace)
        _run_ip(
            "neigh", "replace", self.host, "lladdr", namespace_mac,
            "dev", self.host_link, "nud", "permanent",
        )  # fmt: skip
        _run_ip(
            "-n", self.namespace, "neigh", "replace", self.gateway, "lladdr",
            host_mac, "dev", self.namespace_link, "nud", "permanent",
        )  # fmt: skip

    def _kill_namespace_processes(self) -> None:
        """SIGKILL every process left in the namespace, checking each one first."""
        if not self._namespace_created or self.namespace_inode() is None:
            return
        for word in _run_ip("netns", "pids", self.namespace).split():
            pid = int(word)
            try:
                pidfd = os.pidfd_open(pid)
            except ProcessLookupError:
                continue
            try:
                # The check runs after the pidfd is open and the signal goes
                # through it, so a process that reused a freed PID is never hit.
                if self.owns_process(pid):
                    logger.info(
                        "%s: killing pid %d left in the namespace", self.name, pid
                    )
                    with contextlib.suppress(ProcessLookupError):
                        signal.pidfd_send_signal(pidfd, signal.SIGKILL)
            finally:
                os.close(pidfd)

    def _delete_link(self) -> None:
        if self._link_created:
            # Deleting one end of a veth pair deletes the other.
            _run_ip("link", "delete", self.host_link)
            self._link_created = False

    def _delete_namespace(self) -> None:
        if self._namespace_created:
            _run_ip("netns", "delete", self.namespace)
            self._namespace_created = False
            self.is_cut = False


def _close_open_hosts() -> None:
    with _open_hosts_lock:
        hosts = list(_open_hosts)
    for host in hosts:
        try:
            host.close()
        except Exception as error:
            logger.warning("%s: cleanup at exit failed: %s", host.name, error)


atexit.register(_close_open_hosts)
