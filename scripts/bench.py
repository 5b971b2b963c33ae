"""Measure Job Balancer against GNU parallel and a raw asyncssh loop.

Starts four sshd worker hosts on 127.0.0.1 for a throwaway account, runs the
server on SQLite and, when the local MariaDB responds, on MariaDB, and prints
one table of medians over the repetitions. docs/benchmarks.md records the
figures and how to read them. Run it as scripts/bench [--quick] [--repeat N].
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import asyncssh
import benchkit
import httpx
from benchkit import BenchHost, DatabaseProbe, Figure, Server

from orchestrator.transports import ssh as ssh_transport


@dataclass
class Sizes:
    """How much work each case does; --quick shrinks everything."""

    throughput_jobs: int = 2000
    latency_jobs: int = 500
    output_bytes: int = 200 * 1000 * 1000
    submissions: int = 4000
    scale_workers: int = 100
    scale_rows: int = 1_000_000
    page_requests: int = 100
    idle_seconds: float = 20.0

    @classmethod
    def quick(cls) -> Sizes:
        """Return the smoke-test sizes: every figure, a few dozen jobs."""
        return cls(40, 20, 5 * 1000 * 1000, 200, 6, 20_000, 20, 3.0)


CLIENTS = 16
SUBMIT_CLIENTS = 32
WORKERS = 4
SLOTS_PER_WORKER = 4
POLL_SECONDS = 0.01


@dataclass
class Context:
    """Shared state of the cases: sizes, hosts, their ssh config, a scratch folder."""

    sizes: Sizes
    hosts: list[BenchHost]
    ssh_config: Path
    folder: Path
    results: list[Figure]
    output_file: Path
    output_digest: str

    def add(self, key: str, backend: str, value: float, unit: str) -> None:
        """Record one figure and show it at once."""
        self.results.append(Figure(key, backend, value, unit))
        print(f"  {key} [{backend}]: {value:.4g} {unit}", flush=True)


# Throughput


def server_throughput(ctx: Context, server: Server, backend: str) -> None:
    """Submit trivial jobs from concurrent clients and time them to the end."""
    probe = DatabaseProbe(server, backend)
    try:
        request = benchkit.post_request(server, "/addJob", {"command": "true"})
        total = ctx.sizes.throughput_jobs
        first, _, ids = asyncio.run(benchkit.post_many(server, request, total, CLIENTS))
        while probe.active_jobs() > 0:
            time.sleep(POLL_SECONDS)
        end = time.time()
        succeeded = probe.scalar(
            "SELECT COUNT(*) FROM jobs WHERE id >= %s AND id <= %s AND state = %s",
            min(ids),
            max(ids),
            "succeeded",
        )
    finally:
        probe.close()
    if succeeded != total:
        raise benchkit.BenchError(
            f"{total - succeeded} of {total} jobs did not succeed"
        )
    ctx.add("throughput.server", backend, total / (end - first), "jobs/s")


def parallel_throughput(ctx: Context) -> None:
    """Run the same jobs with GNU parallel over ssh ControlMaster connections."""
    login_file = ctx.folder / "sshloginfile"
    # GNU parallel counts -j per sshlogin, so -j4 on four hosts gives the 16
    # slots in total that the server has (four workers with max_jobs 4).
    login_file.write_text(
        "".join(f"ssh -F {ctx.ssh_config} {h.name}\n" for h in ctx.hosts)
    )
    for host in ctx.hosts:
        subprocess.run(
            ["ssh", "-F", str(ctx.ssh_config), host.name, "true"], check=True
        )
    total = ctx.sizes.throughput_jobs
    command = [
        "parallel",
        "--will-cite",
        "-N0",
        f"-j{SLOTS_PER_WORKER}",
        "--sshloginfile",
        str(login_file),
        "true",
    ]
    started = time.time()
    subprocess.run(
        command,
        input="".join(f"{n}\n" for n in range(total)),
        text=True,
        check=True,
    )
    ctx.add("throughput.parallel", "-", total / (time.time() - started), "jobs/s")


async def _raw_loop(
    hosts: list[BenchHost], total: int, make_command: Callable[[int], str]
) -> float:
    connections = [
        await asyncssh.connect(
            host.host,
            port=host.port,
            username=host.user,
            client_keys=[str(host.client_key_path)],
            known_hosts=None,
            agent_path=None,
            config=[],
        )
        for host in hosts
    ]
    next_job = 0

    async def slot(conn: asyncssh.SSHClientConnection) -> None:
        nonlocal next_job
        while next_job < total:
            job = next_job
            next_job += 1
            result = await conn.run(make_command(job), check=False)
            if result.exit_status is None:
                # sshd closed the channel without a status: run the job again.
                result = await conn.run(make_command(job), check=False)
            if result.exit_status != 0:
                raise benchkit.BenchError(f"raw job exited {result.exit_status}")

    started = time.time()
    await asyncio.gather(
        *(slot(c) for c in connections for _ in range(SLOTS_PER_WORKER))
    )
    elapsed = time.time() - started
    for conn in connections:
        conn.close()
    return total / elapsed


def raw_throughput(ctx: Context) -> None:
    """Run the jobs over pooled asyncssh connections without HTTP or SQL.

    The second figure wraps each job in the server's detached run script, so
    the gap between the two is the cost of that script on the worker.
    """
    total = ctx.sizes.throughput_jobs
    rate = asyncio.run(_raw_loop(ctx.hosts, total, lambda _: "true"))
    ctx.add("throughput.raw_asyncssh", "-", rate, "jobs/s")
    token = f"bench{time.monotonic_ns()}"

    def wrapped(job: int) -> str:
        return _run_script(f'"$HOME/.cache/jobbalancer-bench/{token}-{job}"', "true")

    rate = asyncio.run(_raw_loop(ctx.hosts, total, wrapped))
    ctx.add("throughput.raw_run_script", "-", rate, "jobs/s")
    subprocess.run(
        ["ssh", "-F", str(ctx.ssh_config), ctx.hosts[0].name]
        + ["rm -rf $HOME/.cache/jobbalancer-bench"],
        check=True,
    )


# Dispatch latency


def _run_script(run_dir: str, command: str) -> str:
    values = {
        "run_dir": run_dir,
        "command": shlex.quote(command),
        "out_start": 1,
        "err_start": 1,
        "poll": ssh_transport.FOLLOW_POLL_SECONDS,
    }
    marker = getattr(ssh_transport, "STREAM_MARKER", b"").decode()
    return ssh_transport.RUN_SCRIPT.format(marker=marker, **values)


async def _raw_latencies(host: BenchHost, count: int, wrap: bool) -> list[float]:
    conn = await asyncssh.connect(
        host.host,
        port=host.port,
        username=host.user,
        client_keys=[str(host.client_key_path)],
        known_hosts=None,
        agent_path=None,
        config=[],
    )
    token = f"latency{time.monotonic_ns()}"
    values = []
    try:
        for job in range(count):
            command = "date +%s.%N"
            if wrap:
                run_dir = f'"$HOME/.cache/jobbalancer-bench/{token}-{job}"'
                command = _run_script(run_dir, command)
            sent = time.time()
            result = await conn.run(command, check=False)
            clock = (result.stdout or "").strip().splitlines()[-1]
            values.append(float(clock) - sent)
        await conn.run("rm -rf $HOME/.cache/jobbalancer-bench", check=False)
    finally:
        conn.close()
    return values


def raw_latency(ctx: Context) -> None:
    """Time a bare SSH channel, and one running the run script, to the clock."""
    count = ctx.sizes.latency_jobs // 5
    for wrap, name in ((False, "raw_asyncssh"), (True, "raw_run_script")):
        values = asyncio.run(_raw_latencies(ctx.hosts[0], count, wrap))
        p50 = benchkit.percentile(values, 0.50) * 1000
        ctx.add(f"latency.{name}_p50", "-", p50, "ms")


async def _latencies(server: Server, count: int) -> list[float]:
    connection = benchkit.HttpConnection("127.0.0.1", server.port)
    await connection.open()
    payload = {"command": "date +%s.%N", "wait": True}
    request = benchkit.post_request(server, "/addJob", payload)
    values = []
    try:
        for _ in range(count):
            sent = time.time()
            status, body = await connection.send(request)
            answer = json.loads(body)
            if status != 200 or answer.get("state") != "succeeded":
                raise benchkit.BenchError(f"latency job failed: {body[:300]!r}")
            values.append(float(answer["stdout"]) - sent)
    finally:
        connection.close()
    return values


def dispatch_latency(ctx: Context, server: Server, backend: str) -> None:
    """Time from sending POST /addJob to the command's clock reading."""
    values = asyncio.run(_latencies(server, ctx.sizes.latency_jobs))
    ctx.add("latency.p50", backend, benchkit.percentile(values, 0.50) * 1000, "ms")
    ctx.add("latency.p99", backend, benchkit.percentile(values, 0.99) * 1000, "ms")


# Output capture


def make_output_file(folder: Path, size: int) -> tuple[Path, str]:
    """Write ``size`` random bytes for the output case and return its SHA-256."""
    path = folder / "output.bin"
    digest = hashlib.sha256()
    with path.open("wb") as handle:
        written = 0
        while written < size:
            block = __import__("os").urandom(min(1 << 20, size - written))
            handle.write(block)
            digest.update(block)
            written += len(block)
    path.chmod(0o644)
    return path, digest.hexdigest()


def server_output(ctx: Context, server: Server, backend: str) -> None:
    """Store one job's large stdout and time first to last byte in SQL."""
    size = ctx.output_file.stat().st_size
    with server.client() as client:
        warmup = server.submit(client, command="head -c 1000000 /dev/zero")
        server.wait_job(client, warmup["id"])
        benchkit.reset_peak_rss(server.pid)
        before = benchkit.memory_kib(server.pid)["VmRSS"]
        job_id = server.submit(client, command=f"cat {ctx.output_file}")["id"]
        first, last = _watch_log_bytes(server, backend, job_id, size)
        peak = benchkit.memory_kib(server.pid)["VmHWM"]
        job = server.wait_job(client, job_id, timeout=600)
        digest = hashlib.sha256()
        url = f"/api/v1/jobs/{job_id}/log"
        with client.stream("GET", url, params={"stream": "stdout"}) as response:
            for block in response.iter_bytes():
                digest.update(block)
    if job["state"] != "succeeded":
        raise benchkit.BenchError(f"output job ended {job['state']}: {job}")
    ctx.add("output.server", backend, size / 1e6 / (last - first), "MB/s")
    exact = digest.hexdigest() == ctx.output_digest
    ctx.add("output.byte_exact", backend, 1.0 if exact else 0.0, "bool")
    ctx.add("output.peak_rss_growth", backend, (peak - before) / 1024, "MiB")


def _watch_log_bytes(
    server: Server, backend: str, job_id: int, size: int
) -> tuple[float, float]:
    probe = DatabaseProbe(server, backend)
    first = None
    deadline = time.monotonic() + 600
    try:
        while time.monotonic() < deadline:
            stored = probe.log_bytes(job_id)
            now = time.time()
            if stored > 0 and first is None:
                first = now
            if stored >= size:
                return first or now, now
            time.sleep(POLL_SECONDS)
    finally:
        probe.close()
    raise benchkit.BenchError(f"job {job_id} stored too little output in time")


def ssh_output(ctx: Context) -> None:
    """Time the same bytes through a plain ``ssh host cat FILE``, first to last."""
    command = ["ssh", "-F", str(ctx.ssh_config), "-o", "ControlPath=none"]
    command += [ctx.hosts[0].name, f"cat {ctx.output_file}"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE)
    assert process.stdout is not None
    first = None
    received = 0
    while block := process.stdout.read1(1 << 20):
        first = first or time.time()
        received += len(block)
    last = time.time()
    if process.wait() != 0 or received != ctx.output_file.stat().st_size:
        raise benchkit.BenchError("ssh did not stream the whole output file")
    ctx.add("output.ssh", "-", received / 1e6 / (last - (first or last)), "MB/s")


# Submission rate


def submission_rate(ctx: Context, server: Server, backend: str) -> None:
    """Measure /addJob responses from 32 clients while every job is queued."""
    benchkit.set_workers_enabled(server, [h.name for h in ctx.hosts], False)
    request = benchkit.post_request(server, "/addJob", {"command": "true"})
    total = ctx.sizes.submissions
    first, last, ids = asyncio.run(
        benchkit.post_many(server, request, total, SUBMIT_CLIENTS)
    )
    if len(ids) != total:
        raise benchkit.BenchError(f"{total - len(ids)} submissions got no response")
    ctx.add("submit.rate", backend, total / (last - first), "requests/s")


# Scale


def scale_idle(
    ctx: Context, server: Server, hosts: list[BenchHost], backend: str, repeat: int
) -> None:
    """Connect many workers and measure the idle server's CPU and RSS."""
    benchkit.register_workers(server, [], timeout=60)
    base_cpu, base_rss = _idle_window(server, ctx.sizes.idle_seconds)
    benchkit.register_workers(server, hosts, timeout=300)
    # Let the first liveness checks settle before measuring.
    time.sleep(min(10.0, ctx.sizes.idle_seconds))
    ctx.add("scale.idle_cpu_base", backend, base_cpu * 100, "% core")
    for _ in range(repeat):
        cpu, rss = _idle_window(server, ctx.sizes.idle_seconds)
        ctx.add("scale.idle_cpu", backend, cpu * 100, "% core")
        per_worker = (rss - base_rss) / 1024 / len(hosts)
        ctx.add("scale.rss_per_worker", backend, per_worker, "MiB")


def _idle_window(server: Server, seconds: float) -> tuple[float, int]:
    start_cpu = benchkit.cpu_seconds(server.pid)
    start = time.monotonic()
    time.sleep(seconds)
    used = benchkit.cpu_seconds(server.pid) - start_cpu
    return used / (time.monotonic() - start), benchkit.memory_kib(server.pid)["VmRSS"]


def fill_jobs(server: Server, backend: str, rows: int) -> None:
    """Insert ``rows`` finished jobs with one INSERT ... SELECT, not the API."""
    columns = (
        "state, command, class_id, user_id, need_realtime, exit_code, created_at, "
        "started_at, finished_at, attempt, log_bytes, log_truncated, retries, "
        "retry_delay, retry_on"
    )
    values = (
        "'succeeded', 'true', (SELECT MIN(id) FROM worker_classes), "
        "(SELECT MIN(id) FROM users), 0, 0, '2026-01-01 00:00:00', "
        "'2026-01-01 00:00:00', '2026-01-01 00:00:01', 1, 0, 0, 0, 0, 'infra'"
    )
    if backend == "sqlite":
        import sqlite3

        path = server.workdir / "data" / "jobbalancer.db"
        conn = sqlite3.connect(path, timeout=60)
        with conn:
            conn.execute(
                f"WITH RECURSIVE n(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM n "
                f"WHERE x < {rows}) INSERT INTO jobs ({columns}) SELECT {values} FROM n"
            )
        conn.close()
        return
    import pymysql

    conn = pymysql.connect(host="127.0.0.1", user="root", database="jobbalancer_bench")
    with conn, conn.cursor() as cursor:
        cursor.execute(
            f"INSERT INTO jobs ({columns}) SELECT {values} FROM seq_1_to_{rows}"
        )
        conn.commit()


def jobs_page(ctx: Context, server: Server, backend: str) -> None:
    """Time GET /api/v1/jobs and the HTML /jobs page over a full jobs table."""
    count = ctx.sizes.page_requests
    with server.client() as client:
        api = _time_requests(client, "/api/v1/jobs", count)
    ctx.add("scale.jobs_api_p95", backend, benchkit.percentile(api, 0.95) * 1000, "ms")
    with httpx.Client(base_url=server.url, timeout=120) as browser:
        _log_in(browser, server)
        html = _time_requests(browser, "/jobs", count)
    ctx.add(
        "scale.jobs_html_p95", backend, benchkit.percentile(html, 0.95) * 1000, "ms"
    )


def _time_requests(client: httpx.Client, path: str, count: int) -> list[float]:
    client.get(path).raise_for_status()
    values = []
    for _ in range(count):
        started = time.perf_counter()
        response = client.get(path)
        values.append(time.perf_counter() - started)
        response.raise_for_status()
    return values


def _log_in(client: httpx.Client, server: Server) -> None:
    import re

    page = client.get("/login").text
    match = re.search(r'<meta name="csrf-token" content="([^"]+)">', page)
    if match is None:
        raise benchkit.BenchError("the login page has no csrf-token meta tag")
    form = {
        "username": "admin",
        "password": server.admin_password,
        "csrf_token": match.group(1),
    }
    response = client.post("/login", data=form)
    target = response.headers.get("location", "")
    if response.status_code != 303 or target.startswith("/login"):
        raise benchkit.BenchError(f"login failed: {response.status_code} {target}")


# Running and reporting


TARGETS = [
    ("throughput.server / throughput.parallel", ">=", 5.0),
    ("throughput.server / throughput.raw_asyncssh", ">=", 0.5),
    ("latency.p50", "<=", 10.0),
    ("latency.p99", "<=", 50.0),
    ("output.server / output.ssh", ">=", 0.6),
    ("output.byte_exact", ">=", 1.0),
    ("output.peak_rss_growth", "<=", 64.0),
    ("submit.rate", ">=", 1000.0),
    ("scale.idle_cpu - scale.idle_cpu_base", "<=", 2.0),
    ("scale.rss_per_worker", "<=", 1.0),
    ("scale.jobs_api_p95", "<=", 100.0),
    ("scale.jobs_html_p95", "<=", 100.0),
]


def run_server_cases(ctx: Context, backend: str, repetition: int) -> None:
    """Start a fresh server on ``backend`` and run the server-side cases."""
    folder = ctx.folder / f"server-{backend}-{repetition}"
    server = benchkit.start_server(folder, backend)
    try:
        benchkit.register_workers(server, ctx.hosts, max_jobs=SLOTS_PER_WORKER)
        server_throughput(ctx, server, backend)
        dispatch_latency(ctx, server, backend)
        server_output(ctx, server, backend)
        submission_rate(ctx, server, backend)
    finally:
        server.stop()


def run_scale(ctx: Context, backend: str, hosts: list[BenchHost], repeat: int) -> None:
    """Measure many idle workers and a large jobs table on ``backend``."""
    server = benchkit.start_server(ctx.folder / f"scale-{backend}", backend)
    try:
        scale_idle(ctx, server, hosts, backend, repeat)
        benchkit.set_workers_enabled(server, [h.name for h in hosts], False)
        fill_jobs(server, backend, ctx.sizes.scale_rows)
        for _ in range(repeat):
            jobs_page(ctx, server, backend)
    finally:
        server.stop()


def summarize(results: list[Figure]) -> dict[tuple[str, str], tuple[float, int, str]]:
    """Return {(key, backend): (median, runs, unit)}."""
    grouped: dict[tuple[str, str], list[Figure]] = {}
    for figure in results:
        grouped.setdefault((figure.key, figure.backend), []).append(figure)
    return {
        key: (benchkit.median([f.value for f in group]), len(group), group[0].unit)
        for key, group in grouped.items()
    }


def evaluate(summary: dict[tuple[str, str], tuple[float, int, str]]) -> list[str]:
    """Return one line per target and backend: the value and whether it is met."""
    lines = []
    backends = sorted({b for _, b in summary if b != "-"})
    for expression, op, limit in TARGETS:
        for backend in backends:
            value = _expression_value(expression, backend, summary)
            if value is None:
                continue
            met = value >= limit if op == ">=" else value <= limit
            verdict = "met" if met else "MISSED"
            lines.append(
                f"{expression:<44} {backend:<8} {value:>10.3f}  {op} {limit:<8g} "
                f"{verdict}"
            )
    return lines


def _expression_value(
    expression: str,
    backend: str,
    summary: dict[tuple[str, str], tuple[float, int, str]],
) -> float | None:
    def lookup(key: str) -> float | None:
        found = summary.get((key, backend)) or summary.get((key, "-"))
        return None if found is None else found[0]

    for op in (" / ", " - "):
        if op in expression:
            left, right = (lookup(part) for part in expression.split(op))
            if left is None or right is None:
                return None
            return left / right if op == " / " else left - right
    return lookup(expression)


def print_report(results: list[Figure]) -> None:
    """Print the table of medians and the targets."""
    summary = summarize(results)
    print("\nMedians")
    print(f"{'figure':<28} {'backend':<8} {'median':>12} {'unit':<11} runs")
    for (key, backend), (value, runs, unit) in sorted(summary.items()):
        print(f"{key:<28} {backend:<8} {value:>12.4g} {unit:<11} {runs}")
    print("\nTargets (from the medians above)")
    for line in evaluate(summary):
        print(line)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Read the command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="smoke mode: a few dozen jobs per case"
    )
    parser.add_argument(
        "--repeat", type=int, default=3, help="repetitions of each case (default 3)"
    )
    parser.add_argument(
        "--backend",
        action="append",
        choices=("sqlite", "mariadb"),
        help="database backends to run (default: sqlite, and mariadb when it responds)",
    )
    parser.add_argument(
        "--only",
        action="append",
        choices=("server", "baselines", "scale"),
        help="run only these groups of cases (default: all)",
    )
    parser.add_argument("--json", type=Path, help="also write every figure here")
    parser.add_argument(
        "--keep", action="store_true", help="keep the scratch folder for inspection"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print the table."""
    args = parse_args(argv)
    # SIGTERM ends the run through the finally blocks, which stop the hosts.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    sizes = Sizes.quick() if args.quick else Sizes()
    backends = args.backend or ["sqlite"] + (
        ["mariadb"] if benchkit.mariadb_reachable() else []
    )
    groups = set(args.only or ("server", "baselines", "scale"))

    benchkit.ensure_bench_user()
    folder = Path(tempfile.mkdtemp(prefix="jobbalancer-bench-"))
    folder.chmod(0o755)
    print(f"Scratch folder {folder}; backends {', '.join(backends)}", flush=True)
    hosts = benchkit.start_hosts(WORKERS, folder / "hosts")
    output_file, digest = make_output_file(folder, sizes.output_bytes)
    config = benchkit.write_ssh_config(hosts, folder)
    ctx = Context(sizes, hosts, config, folder, [], output_file, digest)

    try:
        _run_all(ctx, args.repeat, backends, groups)
    finally:
        benchkit.testhost.stop_hosts(hosts)
        for host in hosts:
            subprocess.run(
                ["ssh", "-F", str(config), "-O", "exit", host.name],
                capture_output=True,
            )
        if args.json:
            args.json.write_text(json.dumps([asdict(f) for f in ctx.results], indent=1))
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)
    print_report(ctx.results)
    return 0


def _run_all(ctx: Context, repeat: int, backends: list[str], groups: set[str]) -> None:
    for repetition in range(repeat):
        print(f"Repetition {repetition + 1} of {repeat}", flush=True)
        if "baselines" in groups:
            parallel_throughput(ctx)
            raw_throughput(ctx)
            raw_latency(ctx)
            ssh_output(ctx)
        if "server" in groups:
            for backend in backends:
                run_server_cases(ctx, backend, repetition)
    if "scale" not in groups:
        return
    hosts = benchkit.start_hosts(ctx.sizes.scale_workers, ctx.folder / "scale-hosts")
    try:
        for backend in backends:
            print(f"Scale on {backend}", flush=True)
            run_scale(ctx, backend, hosts, repeat)
    finally:
        benchkit.testhost.stop_hosts(hosts)


if __name__ == "__main__":
    sys.exit(main())
