"""Separate hosts on one machine for a multi-host Ray test: Linux network namespaces, each with its own address.

Every host is a network namespace of its own: its own interfaces, addresses, routes and port space. The head's
namespace holds a bridge (198.18.0.1/24); every other host is joined to it by a veth pair whose far end, ``eth0``
inside that host, carries the host's address. The addresses are from 198.18.0.0/15 (RFC 2544's benchmarking range)
and exist only inside these namespaces: nothing is added to the machine's own namespace, no route leads out, and
every Ray process listens on its namespace's interfaces alone. Ray, torch.distributed and the object store therefore
go host to host over the veths exactly as between machines; only the filesystem is shared (the run directory then
plays the part of a shared volume).

Processes are started in a host with ``ip netns exec``; a host's processes are found with ``ip netns pids``, which is
how a host is killed (SIGKILL to every process in it: the raylet, its agents and workers, as a lost machine) and
how everything is torn down. ``ray stop`` is never used: it kills Ray processes by name in every namespace, other
clusters on the machine included. Needs root (or CAP_NET_ADMIN and CAP_SYS_ADMIN).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

RAY = str(Path(sys.executable).parent / "ray")
SUBNET = "198.18.0"          # /24 inside 198.18.0.0/15
GCS_PORT = 6379              # each namespace has its own port space: Ray's defaults collide with nothing
DASHBOARD_PORT = 8265
OBJECT_STORE_BYTES = 128 * 2**20
_HTTP_GET = ("import sys, urllib.request\n"
             "sys.stdout.write(urllib.request.urlopen(sys.argv[1], timeout=10).read().decode())")


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run(["ip", *args], capture_output=True, text=True)
    if check and done.returncode != 0:
        raise RuntimeError(f"`ip {' '.join(args)}` failed: {done.stderr.strip()}")
    return done


def netns_unavailable() -> str | None:
    """Why network-namespace hosts cannot be made here, or None when they can (a namespace with a bridge and a veth
    pair is created and deleted again)."""
    if not sys.platform.startswith("linux"):
        return "network namespaces are Linux-only"
    if os.geteuid() != 0:
        return "creating network namespaces (`ip netns add`) and veth pairs needs root"
    if shutil.which("ip") is None:
        return "iproute2's `ip` command is not installed"
    probe = f"nrprobe{os.getpid()}"
    done = _ip("netns", "add", probe, check=False)
    if done.returncode != 0:
        return f"`ip netns add` failed: {done.stderr.strip()}"
    try:
        for args in (["link", "add", "br0", "type", "bridge"], ["link", "add", "va", "type", "veth", "peer", "vb"]):
            done = _ip("-n", probe, *args, check=False)
            if done.returncode != 0:
                return f"`ip link add {' '.join(args[2:])}` in a namespace failed: {done.stderr.strip()}"
    finally:
        _ip("netns", "del", probe, check=False)
    return None


@dataclass
class Host:
    name: str
    netns: str
    ip: str
    num_cpus: float
    resources: dict[str, float]
    starts: int = 0                      # Ray nodes started in this host so far (each gets its own temp dir)
    temp_dir: str = ""                   # the current node's --temp-dir
    node_ids: list[str] = field(default_factory=list)  # filled by HostCluster.wait_for_nodes, oldest first


class HostCluster:
    """A Ray head in host ``head`` and one worker node per other host, each host a network namespace.

    ``hosts`` maps a host name to (logical CPUs, custom resources); the head comes first."""

    def __init__(self, hosts: dict[str, tuple[float, dict[str, float]]]):
        self.root = tempfile.mkdtemp(prefix="nsray-", dir="/tmp")   # short: Ray's socket paths live under it
        tag = f"nr{os.getpid() % 100000}"
        self.hosts = {name: Host(name, f"{tag}{name[:3]}", f"{SUBNET}.{n + 1}", cpus, res)
                      for n, (name, (cpus, res)) in enumerate(hosts.items())}
        self.head = next(iter(self.hosts.values()))
        self.gcs_address = f"{self.head.ip}:{GCS_PORT}"
        self.dashboard_url = f"http://{self.head.ip}:{DASHBOARD_PORT}"
        self._made: list[str] = []

    # ------------------------------------------------------------------ network
    def create_network(self) -> None:
        head = self.head
        for host in self.hosts.values():
            _ip("netns", "add", host.netns)
            self._made.append(host.netns)
            _ip("-n", host.netns, "link", "set", "lo", "up")
        _ip("-n", head.netns, "link", "add", "br0", "type", "bridge")
        _ip("-n", head.netns, "addr", "add", f"{head.ip}/24", "dev", "br0")
        _ip("-n", head.netns, "link", "set", "br0", "up")
        for n, host in enumerate(self.hosts.values()):
            if host is head:
                continue
            # Both ends are made inside namespaces: the machine's own namespace never sees them.
            _ip("-n", head.netns, "link", "add", f"v{n}", "type", "veth", "peer", "name", "eth0", "netns", host.netns)
            _ip("-n", head.netns, "link", "set", f"v{n}", "master", "br0")
            _ip("-n", head.netns, "link", "set", f"v{n}", "up")
            _ip("-n", host.netns, "addr", "add", f"{host.ip}/24", "dev", "eth0")
            _ip("-n", host.netns, "link", "set", "eth0", "up")

    def exec_argv(self, host: str, argv: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.hosts[host].netns, *argv]

    def env(self, temp_dir: str) -> dict[str, str]:
        """The environment of every Ray process in the hosts: multi-node mode on (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=1;
        the test session's 0 would pin every node to 127.0.0.1 and refuse `ray start --address`), a private
        RAY_TMPDIR for the current-cluster file, no usage-stats reporting."""
        env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1", "RAY_TMPDIR": temp_dir,
               "RAY_USAGE_STATS_ENABLED": "0"}
        env.pop("RAY_ADDRESS", None)
        return env

    # ------------------------------------------------------------------ Ray nodes
    def _ray_start_argv(self, host: Host) -> list[str]:
        host.starts += 1
        host.temp_dir = os.path.join(self.root, f"{host.name[:3]}{host.starts}")
        os.makedirs(host.temp_dir)
        argv = [RAY, "start", f"--node-ip-address={host.ip}", f"--num-cpus={host.num_cpus}",
                f"--resources={json.dumps(host.resources)}", f"--temp-dir={host.temp_dir}",
                f"--object-store-memory={OBJECT_STORE_BYTES}", "--disable-usage-stats"]
        if host is self.head:
            argv += ["--head", f"--port={GCS_PORT}", "--include-dashboard=true", f"--dashboard-host={host.ip}",
                     f"--dashboard-port={DASHBOARD_PORT}"]
        else:
            argv += [f"--address={self.gcs_address}"]
        return argv

    def _start(self, names: list[str]) -> None:
        """`ray start` in each named host at once (it returns once the node has registered with the GCS); output
        in ROOT/HOST-N.log."""
        procs = []
        for name in names:
            host = self.hosts[name]
            argv = self.exec_argv(name, self._ray_start_argv(host))
            log = open(os.path.join(self.root, f"{name}-{host.starts}.log"), "w")
            # Not a pipe: the node's daemons inherit the descriptors and would hold a pipe open.
            procs.append((name, log, subprocess.Popen(argv, env=self.env(host.temp_dir), stdout=log,
                                                      stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)))
        for name, log, proc in procs:
            rc = proc.wait(timeout=180)
            log.close()
            if rc != 0:
                raise RuntimeError(f"`ray start` in host {name} exited {rc}:\n{Path(log.name).read_text()[-4000:]}")

    def start(self) -> None:
        """The network, the head (and its job server), then every worker node; returns once all are alive."""
        self.create_network()
        self._start([self.head.name])
        self.wait_for_job_server()
        for name in self.hosts:  # one at a time: `ray start` gives a node 30 s to register, too few for three
            if name != self.head.name:  # raylets starting at once on a loaded 2-core machine
                self._start([name])
        self.wait_for_nodes()

    def start_worker(self, name: str) -> None:
        """A fresh Ray node in host ``name`` (a new node id at the host's address), e.g. after kill_host; returns
        once the GCS lists it alive."""
        before = set(self.hosts[name].node_ids)
        self._start([name])
        self.wait_for_nodes(new_in=(name, before))

    def alive(self, name: str) -> bool:
        return bool(self.pids(name))

    # ------------------------------------------------------------------ the head's HTTP API, from inside the head
    def http_json(self, path: str):
        done = subprocess.run(self.exec_argv(self.head.name, [sys.executable, "-I", "-c", _HTTP_GET,
                                                              self.dashboard_url + path]),
                              capture_output=True, text=True, timeout=60)
        if done.returncode != 0:
            raise RuntimeError(f"GET {path} from the head failed: {done.stderr.strip()[-2000:]}")
        return json.loads(done.stdout)

    def wait_for_job_server(self, timeout_s: float = 180) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                self.http_json("/api/jobs/")
                return
            except (RuntimeError, json.JSONDecodeError, subprocess.TimeoutExpired) as err:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the head's job server at {self.dashboard_url} did not come up in "
                                       f"{timeout_s} s: {err}") from None
                time.sleep(2)

    def nodes(self) -> dict[str, dict]:
        """Every node the GCS knows, dead ones included: node id → the state API's record (node_ip, state, ...)."""
        reply = self.http_json("/api/v0/nodes?limit=1000&detail=1")
        return {n["node_id"]: n for n in reply["data"]["result"]["result"]}

    def actors(self, class_name: str, job_id: str | None = None) -> list[dict]:
        """The state API's records of every actor of ``class_name`` (of job ``job_id`` only, if given), dead ones
        included."""
        reply = self.http_json(f"/api/v0/actors?limit=1000&detail=1&filter_keys=class_name&filter_predicates=%3D"
                               f"&filter_values={class_name}")
        return [a for a in reply["data"]["result"]["result"] if job_id is None or a["job_id"] == job_id]

    def job_id(self, done: subprocess.CompletedProcess) -> str:
        """The Ray job id (the driver's, which its actors carry) of the submission whose output is ``done``."""
        submission = re.search(r"Job '(\S+)' submitted successfully", done.stdout)
        if submission is None:
            raise RuntimeError(f"no submission id in the `ray job submit` output:\n{done.stdout[-3000:]}")
        return self.http_json(f"/api/jobs/{submission.group(1)}")["job_id"]

    def wait_for_nodes(self, timeout_s: float = 180, new_in: tuple[str, set[str]] | None = None) -> None:
        """Until every host that runs Ray has an alive node at its address with its resources (with ``new_in``
        (host, node ids): one not among those ids); records each host's node ids (Host.node_ids, oldest first)."""
        deadline = time.monotonic() + timeout_s
        while True:
            nodes = self.nodes()
            missing = []
            for host in self.hosts.values():
                ids = sorted((n for n in nodes.values() if n["node_ip"] == host.ip),
                             key=lambda n: n.get("start_time_ms") or 0)
                host.node_ids = [n["node_id"] for n in ids]
                live = [n for n in ids if n["state"] == "ALIVE"
                        and all(n["resources_total"].get(k) == v for k, v in host.resources.items())
                        and (new_in is None or new_in[0] != host.name or n["node_id"] not in new_in[1])]
                if self.alive(host.name) and not live:
                    missing.append(host.name)
            if not missing:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"no alive Ray node in host(s) {missing} after {timeout_s} s: {nodes}")
            time.sleep(1)

    def host_of_node(self, node_id: str, nodes: dict[str, dict] | None = None) -> str:
        """The host whose address the node ``node_id`` has (``nodes``: a reply of nodes(), else asked now)."""
        ip = (nodes or self.nodes())[node_id]["node_ip"]
        return next(host.name for host in self.hosts.values() if host.ip == ip)

    # ------------------------------------------------------------------ jobs
    def submit(self, config: str | Path, log_path: str | Path, working_dir: str | Path) -> "SubmittedJob":
        """`ray job submit` (waiting for the job's end) of `nashray run CONFIG`, run inside the head's host against
        its dashboard address, with ``working_dir`` as the job's working dir."""
        argv = [RAY, "job", "submit", "--address", self.dashboard_url, "--working-dir", str(working_dir),
                "--runtime-env-json", json.dumps({"excludes": [".venv", ".git", "runs"]}),
                "--", sys.executable, "-m", "nashray.cli", "run", str(config)]
        client_tmp = os.path.join(self.root, "client")
        os.makedirs(client_tmp, exist_ok=True)
        log = open(log_path, "w")
        proc = subprocess.Popen(self.exec_argv(self.head.name, argv), env=self.env(client_tmp), stdout=log,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        return SubmittedJob(argv, proc, log)

    # ------------------------------------------------------------------ killing and teardown
    def pids(self, name: str) -> list[int]:
        done = _ip("netns", "pids", self.hosts[name].netns, check=False)
        return [int(p) for p in done.stdout.split()]

    def kill_host(self, name: str, timeout_s: float = 30) -> list[int]:
        """SIGKILL to every process of host ``name`` until none is left (a machine lost at once); the pids killed."""
        killed: list[int] = []
        deadline = time.monotonic() + timeout_s
        while pids := [p for p in self.pids(name) if p != os.getpid()]:
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
                except ProcessLookupError:
                    pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"host {name}: processes {pids} still alive {timeout_s} s after SIGKILL")
            time.sleep(0.1)
        return killed

    def close(self) -> None:
        """Every process in every host killed, the namespaces (with their veths and bridge) deleted, temp dirs
        removed. Safe after a partial start."""
        for name, host in self.hosts.items():
            if host.netns in self._made:
                try:
                    self.kill_host(name)
                except RuntimeError:
                    pass
        for netns in reversed(self._made):
            _ip("netns", "del", netns, check=False)
        self._made.clear()
        shutil.rmtree(self.root, ignore_errors=True)


@dataclass
class SubmittedJob:
    argv: list[str]
    proc: subprocess.Popen
    log: object

    def running(self) -> bool:
        return self.proc.poll() is None

    def wait(self, timeout_s: float = 600) -> subprocess.CompletedProcess:
        """The `ray job submit` client's exit and output, once the job ended."""
        try:
            rc = self.proc.wait(timeout=timeout_s)
        finally:
            self.log.close()
        return subprocess.CompletedProcess(self.argv, rc, stdout=Path(self.log.name).read_text(), stderr="")
