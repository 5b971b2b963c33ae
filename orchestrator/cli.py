"""The ``jobbalancer`` command: server, administration and client commands."""

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

import httpx

from orchestrator import accounts, config, db, scripts, security, workers
from orchestrator.exceptions import JobBalancerError

logger = logging.getLogger(__name__)

URL_ENV = "JOBBALANCER_URL"
API_KEY_ENV = "JOBBALANCER_API_KEY"
DEFAULT_URL = "http://127.0.0.1:8080"
CLIENT_TIMEOUT_SECONDS = 60.0


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
    add.add_argument("--key", help="SSH private key file")
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


def _add_script_commands(sub: Any) -> None:
    script = sub.add_parser("script", help="manage stored scripts").add_subparsers(
        title="script"
    )
    add = script.add_parser("add", help="store a script and print its id")
    add.add_argument("name")
    add.add_argument("--interpreter", required=True, help="for example /bin/sh")
    add.add_argument("--file", type=Path, required=True, help="script file to store")
    add.set_defaults(handler=cmd_script_add)


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
    settings = _settings(args)
    if args.host:
        settings.host = args.host
    if args.port:
        settings.port = args.port
    engine = _engine(args)
    _bootstrap_admin(engine, settings)
    engine.dispose()
    print(
        f"Job Balancer listening on http://{settings.host}:{settings.port}", flush=True
    )
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level="info",
        access_log=False,
    )


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
    )
    print(f"Added worker {record.name} (id {record.id}) in class {record.class_name}.")


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
    command = words[0] if len(words) == 1 else " ".join(words)
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


if __name__ == "__main__":
    main()
