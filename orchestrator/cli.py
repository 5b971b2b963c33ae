"""The ``jobbalancer`` command: server, administration and client commands."""

import argparse
import getpass
import json
import logging
import os
import shlex
import socket
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from orchestrator import (
    accounts,
    config,
    db,
    inventory,
    keys,
    scripts,
    security,
    workers,
)
from orchestrator.exceptions import JobBalancerError

logger = logging.getLogger(__name__)

URL_ENV = "JOBBALANCER_URL"
API_KEY_ENV = "JOBBALANCER_API_KEY"
DEFAULT_URL = "http://127.0.0.1:8080"
CLIENT_TIMEOUT_SECONDS = 60.0
ROTATION_POLL_SECONDS = 0.5


def main(argv: list[str] | None = None) -> None:
    """Run the command line."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "handler", None):
        parser.print_help()
        sys.exit(2)
    try:
        args.handler(args)
    except (JobBalancerError, config.ConfigError) as exc:
        print(f"jobbalancer: {exc}", file=sys.stderr)
        sys.exit(1)
    except httpx.HTTPError as exc:
        print(f"jobbalancer: request failed: {exc}", file=sys.stderr)
        sys.exit(1)
    except BrokenPipeError:
        # The reader of our output went away (jobbalancer jobs | head).
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        sys.exit(0)


def build_parser() -> argparse.ArgumentParser:
    """Build the argument parser with every subcommand."""
    parser = argparse.ArgumentParser(
        prog="jobbalancer", description="Run shell jobs on SSH workers."
    )
    parser.add_argument(
        "--config",
        type=Path,
        help=f"config file (default: ${config.CONFIG_ENV} "
        "or ~/.config/jobbalancer/config.toml)",
    )
    sub = parser.add_subparsers(title="commands")

    serve = sub.add_parser("serve", help="start the server")
    serve.add_argument("--config", type=Path, dest="serve_config")
    serve.add_argument("--host", help="listen address (default from config)")
    serve.add_argument("--port", type=int, help="listen port (default from config)")
    serve.add_argument(
        "--allow-root", action="store_true", help="run even as root (containers, CI)"
    )
    serve.set_defaults(handler=cmd_serve)

    _add_user_commands(sub)
    _add_worker_commands(sub)
    _add_script_commands(sub)
    _add_key_commands(sub)
    _add_inventory_commands(sub)
    _add_cert_commands(sub)
    _add_client_commands(sub)
    return parser


def _add_user_commands(sub: Any) -> None:
    user = sub.add_parser("user", help="manage users").add_subparsers(title="user")
    add = user.add_parser("add", help="create a user and print its API key")
    add.add_argument("name")
    add.add_argument("--role", choices=accounts.ROLES, default="submitter")
    add.add_argument(
        "--password-env", metavar="VAR", help="read the web password from this variable"
    )
    add.set_defaults(handler=cmd_user_add)


def _add_worker_commands(sub: Any) -> None:
    worker = sub.add_parser("worker", help="manage workers").add_subparsers(
        title="worker"
    )
    add = worker.add_parser("add", help="register a worker")
    add.add_argument("name")
    add.add_argument("--host", default="", help="SSH host name or address")
    add.add_argument("--port", type=int, default=22, help="SSH port")
    add.add_argument("--user", default="", help="SSH user (default: current user)")
    key = add.add_mutually_exclusive_group()
    key.add_argument("--key", help="SSH private key file")
    key.add_argument(
        "--key-name",
        help="stored SSH key to log in with (default: the default stored key)",
    )
    add.add_argument("--class", dest="worker_class", default=workers.DEFAULT_CLASS)
    add.add_argument("--max-jobs", type=int, help="concurrent jobs (default: class)")
    add.add_argument(
        "--max-sessions", type=int, default=10, help="the worker sshd's MaxSessions"
    )
    add.add_argument("--transport", choices=workers.TRANSPORTS, default="ssh")
    add.set_defaults(handler=cmd_worker_add)
    listing = worker.add_parser("list", help="print workers and their state")
    listing.set_defaults(handler=cmd_worker_list)
    for action in ("disable", "enable", "remove"):
        parser = worker.add_parser(action, help=f"{action} a worker")
        parser.add_argument("name")
        parser.set_defaults(handler=cmd_worker_change, action=action)
    accept = worker.add_parser(
        "accept-host-key", help="trust a worker's changed SSH host key"
    )
    accept.add_argument("name")
    accept.add_argument(
        "--fingerprint", help="SHA256 fingerprint the pending key must have"
    )
    accept.set_defaults(handler=cmd_worker_accept_host_key)
    token = worker.add_parser(
        "token", help="issue a new token for an agent worker and print it once"
    )
    token.add_argument("name")
    token.set_defaults(handler=cmd_worker_token)


def _add_script_commands(sub: Any) -> None:
    script = sub.add_parser("script", help="manage stored scripts").add_subparsers(
        title="script"
    )
    add = script.add_parser("add", help="store a script and print its id")
    add.add_argument("name")
    add.add_argument("--interpreter", required=True, help="for example /bin/sh")
    add.add_argument("--file", type=Path, required=True, help="script file to store")
    add.set_defaults(handler=cmd_script_add)


def _add_cert_commands(sub: Any) -> None:
    cert = sub.add_parser("cert", help="TLS certificates").add_subparsers(title="cert")
    generate = cert.add_parser(
        "generate", help="write a self-signed certificate and key for HTTPS"
    )
    generate.add_argument(
        "--dir", type=Path, help="output folder (default: the data folder)"
    )
    generate.add_argument(
        "--host",
        action="append",
        help="host name or address the certificate is for (repeatable; "
        "default: localhost and 127.0.0.1)",
    )
    generate.set_defaults(handler=cmd_cert_generate)


def cmd_cert_generate(args: argparse.Namespace) -> None:
    """Write a self-signed certificate and print the settings that use it."""
    from orchestrator import tls

    settings = _settings(args)
    folder = (args.dir or settings.data_path()).expanduser().resolve()
    folder.mkdir(parents=True, exist_ok=True)
    hosts = args.host or ["localhost", "127.0.0.1"]
    cert_path, key_path = folder / "server.crt", folder / "server.key"
    fingerprint = tls.generate_self_signed(cert_path, key_path, hosts)
    print(f"Wrote {cert_path} and {key_path} (key mode 0600).")
    print(f"SHA-256 fingerprint: {fingerprint}")
    print("Add these lines to the config file and restart the server:")
    print(f'tls_cert_file = "{cert_path}"')
    print(f'tls_key_file = "{key_path}"')


def _add_client_commands(sub: Any) -> None:
    def client(name: str, help_text: str) -> argparse.ArgumentParser:
        parser: argparse.ArgumentParser = sub.add_parser(name, help=help_text)
        parser.add_argument("--url", default=os.environ.get(URL_ENV, DEFAULT_URL))
        parser.add_argument("--api-key", default=os.environ.get(API_KEY_ENV, ""))
        return parser

    submit = client("submit", "submit a command as a job")
    submit.add_argument("--watchdog", type=float, help="kill the job after S seconds")
    submit.add_argument("--class", dest="worker_class", help="worker class name or id")
    submit.add_argument("--realtime", action="store_true", help="reject if no slot")
    submit.add_argument(
        "--wait", action="store_true", help="wait, print the output, exit with its code"
    )
    submit.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND...")
    submit.set_defaults(handler=cmd_submit)
    listing = client("jobs", "list recent jobs")
    listing.add_argument("--limit", type=int, default=20)
    listing.add_argument("--state")
    listing.set_defaults(handler=cmd_jobs)
    log = client("log", "print a job's output")
    log.add_argument("job", type=int)
    log.set_defaults(handler=cmd_log)
    kill = client("kill", "kill a job")
    kill.add_argument("job", type=int)
    kill.set_defaults(handler=cmd_kill)


def _settings(args: argparse.Namespace) -> config.Settings:
    path = getattr(args, "serve_config", None) or args.config
    return config.load_settings(path)


def _engine(args: argparse.Namespace) -> Any:
    settings = _settings(args)
    engine = db.create_db_engine(settings.resolved_database_url())
    db.upgrade_schema(engine)
    workers.ensure_defaults(engine)
    _restrict_files(settings)
    return engine


def cmd_serve(args: argparse.Namespace) -> None:
    """Start the HTTP server and the dispatcher."""
    import uvicorn

    from orchestrator.app import create_app

    if os.geteuid() == 0 and not args.allow_root:
        print(
            "jobbalancer: refusing to run as root: start it as an unprivileged user, "
            "or pass --allow-root inside a container or CI",
            file=sys.stderr,
        )
        sys.exit(1)
    logging.basicConfig(
        level=logging.INFO, format="%(levelname)s: %(name)s: %(message)s"
    )
    # asyncssh logs each channel and its whole command at INFO, which costs
    # more CPU than a trivial job, so only its warnings and errors are kept.
    logging.getLogger("asyncssh").setLevel(logging.WARNING)
    settings = _settings(args)
    if args.host:
        settings.host = args.host
    if args.port:
        settings.port = args.port
    _check_port_free(settings.host, settings.port)
    engine = _engine(args)
    _bootstrap_admin(engine, settings)
    engine.dispose()
    print(
        f"Job Balancer listening on http://{settings.host}:{settings.port}", flush=True
    )
    tls: dict[str, str] = {}
    if settings.tls_cert_file and settings.tls_key_file:
        tls = {
            "ssl_certfile": str(settings.tls_cert_file),
            "ssl_keyfile": str(settings.tls_key_file),
        }
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level="info",
        access_log=False,
        **tls,  # type: ignore[arg-type]
    )


def _check_port_free(host: str, port: int) -> None:
    """Exit with a clear message when the listen address is taken."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise config.ConfigError(f"invalid listen address {host!r}: {exc}") from exc
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as exc:
            raise config.ConfigError(
                f"cannot listen on {host}:{port}: {exc.strerror}; is another "
                "server running? Pick another port with --port"
            ) from exc


def _restrict_files(settings: config.Settings) -> None:
    """Make the data folder, the SQLite file and the config readable by us only."""
    data = settings.data_path()
    paths = [data, data / "jobbalancer.db"]
    if settings.config_path is not None:
        paths.append(settings.config_path)
    for path in paths:
        if path.exists():
            path.chmod(0o700 if path.is_dir() else 0o600)


def _bootstrap_admin(engine: Any, settings: config.Settings) -> None:
    if accounts.count_users(engine) > 0:
        return
    password = security.generate_password()
    user = accounts.create_user(engine, "admin", password, "admin")
    key = accounts.create_api_key(engine, user.id, "created at first start")
    print(
        "\nFirst start: created the admin account. These credentials are shown once.\n"
        f"  web login:  admin / {password}\n"
        f"  API key:    {key}\n"
        f"  config:     {settings.config_path}\n"
        f"  database:   {settings.resolved_database_url()}\n",
        flush=True,
    )


def cmd_user_add(args: argparse.Namespace) -> None:
    """Create a user and print its API key alone on the last line."""
    engine = _engine(args)
    password = os.environ.get(args.password_env, "") if args.password_env else ""
    if args.password_env and not password:
        raise config.ConfigError(f"environment variable {args.password_env} is empty")
    generated = not password
    password = password or security.generate_password()
    user = accounts.create_user(engine, args.name, password, args.role)
    key = accounts.create_api_key(engine, user.id, "created by jobbalancer user add")
    print(f"Created user {user.name} with role {user.role}.")
    if generated:
        print(f"Web password: {password}")
    print("API key (shown once):")
    print(key)


def cmd_worker_add(args: argparse.Namespace) -> None:
    """Register a worker."""
    engine = _engine(args)
    key_path = str(Path(args.key).expanduser().resolve()) if args.key else None
    key_id = keys.get_key(engine, args.key_name).id if args.key_name else None
    token, token_hash = None, None
    if args.transport == "agent":
        token, token_hash = security.generate_agent_token()
    record = workers.add_worker(
        engine,
        args.name,
        transport=args.transport,
        host=args.host,
        port=args.port,
        username=args.user,
        key_path=key_path,
        class_name=args.worker_class,
        max_jobs=args.max_jobs,
        max_sessions=args.max_sessions,
        key_id=key_id,
        token_hash=token_hash,
    )
    print(f"Added worker {record.name} (id {record.id}) in class {record.class_name}.")
    if token is not None:
        _print_agent_token(token)


def cmd_worker_token(args: argparse.Namespace) -> None:
    """Replace an agent worker's token; the old one stops working."""
    engine = _engine(args)
    token, token_hash = security.generate_agent_token()
    workers.set_token_hash(engine, args.name, token_hash)
    print(
        f"Issued a new token for worker {args.name}; the server rejects the old "
        "one within 30 s."
    )
    _print_agent_token(token)


def _print_agent_token(token: str) -> None:
    print("Start the agent with: jobbalancer-agent --server URL --token-file FILE")
    print("Agent token (shown once):")
    print(token)


def cmd_worker_list(args: argparse.Namespace) -> None:
    """Print workers with their state."""
    engine = _engine(args)
    print(f"{'NAME':<16} {'STATE':<9} {'CLASS':<12} {'MAX':>4} ADDRESS  REASON")
    for w in workers.list_workers(engine):
        state = "disabled" if not w.enabled else w.state
        if w.enabled and w.draining:
            state = "draining"
        address = f"{w.username + '@' if w.username else ''}{w.host}:{w.port}"
        if w.transport != "ssh":
            address = w.transport
        print(
            f"{w.name:<16} {state:<9} {w.class_name:<12} {w.max_jobs:>4} "
            f"{address}  {w.reason or ''}".rstrip()
        )


def cmd_worker_change(args: argparse.Namespace) -> None:
    """Disable, enable or remove a worker."""
    engine = _engine(args)
    if args.action == "remove":
        workers.remove_worker(engine, args.name)
    else:
        workers.set_enabled(engine, args.name, args.action == "enable")
    print(f"Worker {args.name}: {args.action}d.")


def cmd_script_add(args: argparse.Namespace) -> None:
    """Store a script and print its id."""
    engine = _engine(args)
    body = args.file.read_text()
    script = scripts.add_script(engine, args.name, args.interpreter, body)
    print(script.id)


def _client(args: argparse.Namespace) -> httpx.Client:
    if not args.api_key:
        raise config.ConfigError(f"no API key: pass --api-key or set {API_KEY_ENV}")
    return httpx.Client(
        base_url=args.url.rstrip("/"),
        headers={"Authorization": f"Bearer {args.api_key}"},
        timeout=CLIENT_TIMEOUT_SECONDS,
    )


def _check(response: httpx.Response) -> Any:
    if response.status_code >= 400:
        try:
            detail = response.json().get("detail", response.text)
        except ValueError:
            detail = response.text
        print(f"jobbalancer: {response.status_code}: {detail}", file=sys.stderr)
        sys.exit(1)
    return response.json()


def cmd_submit(args: argparse.Namespace) -> None:
    """Submit a command; with --wait, print its output and exit with its code."""
    words = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not words:
        raise config.ConfigError("no command given: jobbalancer submit -- COMMAND...")
    # One word is a shell command line as typed; several words are argv, so
    # each is quoted and `submit -- sh -c 'echo a; echo b'` keeps its meaning.
    command = words[0] if len(words) == 1 else shlex.join(words)
    payload: dict[str, Any] = {"command": command, "need_realtime": args.realtime}
    if args.watchdog is not None:
        payload["watchdog"] = args.watchdog
    if args.worker_class:
        payload["workerClassId"] = args.worker_class
    with _client(args) as client:
        if args.wait:
            payload["wait"] = True
            client.timeout = httpx.Timeout(None)
        answer = _check(client.post("/addJob", json=payload))
        if not args.wait:
            print(json.dumps(answer))
            sys.exit(0 if answer.get("result") else 1)
        if answer["state"] == "occupied":
            print(f"jobbalancer: {answer['message']}", file=sys.stderr)
            sys.exit(75)
        job_id = answer["id"]
        for stream, target in (("stdout", sys.stdout), ("stderr", sys.stderr)):
            with client.stream(
                "GET", f"/api/v1/jobs/{job_id}/log", params={"stream": stream}
            ) as response:
                for chunk in response.iter_bytes():
                    target.buffer.write(chunk)
            target.flush()
    exit_code = answer.get("exit_code")
    sys.exit(exit_code if isinstance(exit_code, int) else 1)


def cmd_jobs(args: argparse.Namespace) -> None:
    """Print recent jobs."""
    params: dict[str, Any] = {"limit": args.limit}
    if args.state:
        params["state"] = args.state
    with _client(args) as client:
        answer = _check(client.get("/api/v1/jobs", params=params))
    print(f"{'ID':>7} {'STATE':<10} {'WORKER':<14} {'EXIT':>4}  COMMAND")
    for job in answer["jobs"]:
        what = job["command"] or f"script {job['script_id']} {job['params'] or ''}"
        exit_code = "" if job["exit_code"] is None else job["exit_code"]
        print(
            f"{job['id']:>7} {job['state']:<10} {job['worker'] or '-':<14} "
            f"{exit_code!s:>4}  {what[:60]}"
        )


def cmd_log(args: argparse.Namespace) -> None:
    """Print a job's output bytes."""
    with _client(args) as client:
        with client.stream("GET", f"/api/v1/jobs/{args.job}/log") as response:
            if response.status_code >= 400:
                response.read()
                _check(response)
            for chunk in response.iter_bytes():
                sys.stdout.buffer.write(chunk)
    sys.stdout.flush()


def cmd_kill(args: argparse.Namespace) -> None:
    """Kill a job."""
    with _client(args) as client:
        job = _check(client.post(f"/api/v1/jobs/{args.job}/kill"))
    print(f"Job {job['id']} is {job['state']}.")


def cmd_worker_accept_host_key(args: argparse.Namespace) -> None:
    """Trust the host key a worker presented in place of the recorded one."""
    engine = _engine(args)
    state = keys.accept_host_key(engine, args.name, args.fingerprint)
    print(f"Worker {args.name} now trusts host key {state['fingerprint']}.")


def _add_key_commands(sub: Any) -> None:
    key = sub.add_parser("key", help="manage stored SSH keys").add_subparsers(
        title="key"
    )
    generate = key.add_parser(
        "generate", help="generate a key pair and print its public key line"
    )
    generate.add_argument("name")
    generate.add_argument("--type", choices=tuple(keys.KEY_TYPES), default="ed25519")
    _add_default_option(generate)
    generate.set_defaults(handler=cmd_key_generate)

    imported = key.add_parser(
        "import", help="store an existing private key (OpenSSH or PEM)"
    )
    imported.add_argument("name")
    imported.add_argument("file", type=Path, help="private key file")
    imported.add_argument(
        "--passphrase-env",
        metavar="VAR",
        help="read the key's passphrase from this variable instead of a prompt",
    )
    _add_default_option(imported)
    imported.set_defaults(handler=cmd_key_import)

    listing = key.add_parser("list", help="print stored keys and their fingerprints")
    listing.set_defaults(handler=cmd_key_list)
    public = key.add_parser("public", help="print a key's authorized_keys line")
    public.add_argument("name")
    public.set_defaults(handler=cmd_key_public)

    default = key.add_parser("default", help="make a key the default key")
    default.add_argument("name")
    default.set_defaults(handler=cmd_key_default)
    assign = key.add_parser("assign", help="make workers log in with a key")
    assign.add_argument("name", help="key name, or 'default' for the default key")
    assign.add_argument("workers", nargs="+", metavar="WORKER")
    assign.set_defaults(handler=cmd_key_assign)
    delete = key.add_parser("delete", help="delete a key that no worker uses")
    delete.add_argument("name")
    delete.set_defaults(handler=cmd_key_delete)
    _add_key_rotate_command(key)


def _add_default_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--default",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="make it the default key (default: only when no default key exists)",
    )


def _add_key_rotate_command(key: Any) -> None:
    rotate = key.add_parser(
        "rotate",
        help="replace a key on its workers through the running server",
    )
    rotate.add_argument("name")
    rotate.add_argument("--new-name", help="name of the new key")
    rotate.add_argument("--type", choices=tuple(keys.KEY_TYPES))
    rotate.add_argument(
        "--authorized-keys-file",
        default=".ssh/authorized_keys",
        help="authorized_keys path on the workers, relative to the home folder",
    )
    rotate.add_argument(
        "--keep-old", action="store_true", help="keep the old key in the store"
    )
    rotate.add_argument("--url", default=os.environ.get(URL_ENV, DEFAULT_URL))
    rotate.add_argument("--api-key", default=os.environ.get(API_KEY_ENV, ""))
    rotate.set_defaults(handler=cmd_key_rotate)


def _master_key(args: argparse.Namespace) -> bytes:
    return keys.load_master_key(_settings(args).data_path())


def cmd_key_generate(args: argparse.Namespace) -> None:
    """Generate a key pair; print the public key line on stdout, details on stderr."""
    engine = _engine(args)
    record = keys.generate_key(
        engine, _master_key(args), args.name, args.type, make_default=args.default
    )
    print(record.public_key)
    _print_key_summary(record)


def cmd_key_import(args: argparse.Namespace) -> None:
    """Import a private key file, asking for its passphrase when it has one."""
    engine = _engine(args)
    data = args.file.expanduser().read_bytes()
    passphrase = None
    if args.passphrase_env:
        passphrase = os.environ.get(args.passphrase_env)
        if passphrase is None:
            raise config.ConfigError(
                f"environment variable {args.passphrase_env} is not set"
            )
    master_key = _master_key(args)
    try:
        record = keys.import_key(
            engine, master_key, args.name, data, passphrase, make_default=args.default
        )
    except keys.PassphraseRequiredError:
        if passphrase is not None:
            raise
        passphrase = getpass.getpass(f"Passphrase for {args.file}: ")
        record = keys.import_key(
            engine, master_key, args.name, data, passphrase, make_default=args.default
        )
    print(record.public_key)
    _print_key_summary(record)


def _print_key_summary(record: keys.KeyRecord) -> None:
    default = ", the default key" if record.is_default else ""
    print(
        f"Stored {record.key_type} key {record.name} ({record.fingerprint}{default}).",
        file=sys.stderr,
    )


def cmd_key_list(args: argparse.Namespace) -> None:
    """Print stored keys with their types, fingerprints and workers."""
    engine = _engine(args)
    print(f"{'NAME':<24} {'TYPE':<20} {'DEFAULT':<7} FINGERPRINT  WORKERS")
    for record in keys.list_keys(engine):
        kind = record.key_type
        if record.bits():
            kind += f" {record.bits()}"
        users = ",".join(user.name for user in keys.key_users(engine, record))
        default = "yes" if record.is_default else ""
        print(
            f"{record.name:<24} {kind:<20} {default:<7} {record.fingerprint}  "
            f"{users or '-'}"
        )


def cmd_key_public(args: argparse.Namespace) -> None:
    """Print a key's public half as one authorized_keys line."""
    print(keys.get_key(_engine(args), args.name).public_key)


def cmd_key_default(args: argparse.Namespace) -> None:
    """Make a key the default key."""
    record = keys.set_default_key(_engine(args), args.name)
    print(f"Key {record.name} is now the default key.")


def cmd_key_assign(args: argparse.Namespace) -> None:
    """Assign a key to workers, or 'default' to fall back to the default key."""
    engine = _engine(args)
    key_name = None if args.name == "default" else args.name
    for worker in args.workers:
        keys.assign_key(engine, worker, key_name)
        print(f"Worker {worker} logs in with {key_name or 'the default key'}.")


def cmd_key_delete(args: argparse.Namespace) -> None:
    """Delete a key that no worker uses."""
    keys.delete_key(_engine(args), args.name)
    print(f"Deleted key {args.name}.")


def cmd_key_rotate(args: argparse.Namespace) -> None:
    """Rotate a key through the server and print each worker's progress."""
    payload: dict[str, Any] = {
        "authorized_keys_file": args.authorized_keys_file,
        "delete_old": not args.keep_old,
    }
    if args.new_name:
        payload["new_name"] = args.new_name
    if args.type:
        payload["type"] = args.type
    with _client(args) as client:
        rotation = _check(client.post(f"/api/v1/keys/{args.name}/rotate", json=payload))
        print(f"Rotating {rotation['old_key']} to {rotation['new_key']}.")
        shown: dict[str, str] = {}
        while True:
            for item in rotation["workers"]:
                line = f"{item['state']}: {item['detail'] or ''}".rstrip(": ")
                if shown.get(item["worker"]) != line:
                    shown[item["worker"]] = line
                    print(f"  {item['worker']}: {line}", flush=True)
            if rotation["state"] != "running":
                break
            time.sleep(ROTATION_POLL_SECONDS)
            rotation = _check(client.get(f"/api/v1/keys/rotations/{rotation['id']}"))
    print(f"Rotation {rotation['state']}. {rotation['detail'] or ''}".rstrip())
    sys.exit(0 if rotation["state"] == "succeeded" else 1)


def _add_inventory_commands(sub: Any) -> None:
    group = sub.add_parser(
        "inventory", help="sync workers with an Ansible inventory"
    ).add_subparsers(title="inventory")
    sync = group.add_parser(
        "sync", help="create and update workers and classes from an inventory"
    )
    sync.add_argument("file", type=Path, help="Ansible inventory in YAML format")
    sync.add_argument(
        "--dry-run", action="store_true", help="print the changes without writing"
    )
    sync.set_defaults(handler=cmd_inventory_sync)
    export = group.add_parser(
        "export", help="write the workers as an Ansible YAML inventory"
    )
    export.add_argument(
        "file", type=Path, nargs="?", help="output file (default: stdout)"
    )
    export.set_defaults(handler=cmd_inventory_export)


def cmd_inventory_sync(args: argparse.Namespace) -> None:
    """Create and update workers from an inventory file and print what changed."""
    try:
        text = args.file.expanduser().read_text()
    except OSError as exc:
        raise config.ConfigError(f"cannot read {args.file}: {exc}") from exc
    parsed = inventory.Inventory.from_yaml(text, str(args.file))
    report = inventory.sync_inventory(_engine(args), parsed, dry_run=args.dry_run)
    for line in report.lines():
        print(line)


def cmd_inventory_export(args: argparse.Namespace) -> None:
    """Write the server's SSH workers as an Ansible inventory."""
    text = inventory.export_inventory(_engine(args))
    if args.file is None:
        sys.stdout.write(text)
        return
    args.file.expanduser().write_text(text)
    print(f"Wrote {args.file}.", file=sys.stderr)


if __name__ == "__main__":
    main()
