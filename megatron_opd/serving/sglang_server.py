"""Start, watch and stop one SGLang server process (teacher or rollout), and supervise fleets.

Each server runs in its own process group (SGLang forks a scheduler and a detokenizer), led by
`megatron_opd.serving.watchdog`, which takes the whole group down when the server's main process
exits or the launcher disappears (even by SIGKILL), so stop() and a killed launcher leave no
orphans. The run patches of megatron_opd/compat/sglang_cpu.py (where the scheduler's store
listens, a short server_args log line) are put on the server's PYTHONPATH, with the CPU compat,
which applies only without CUDA.

`ServerSupervisor` restarts dead servers; with a `FleetProbe` it also restarts a server whose
health probe has failed for `health_timeout_s`, drains a down server from its fleet's router and
lets it rejoin once it is ready and (rollout) serves the fleet's current weight version
(docs/fleets.md).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import requests

from megatron_opd.procs import free_port, log_tail, spawn_group, stop_group  # noqa: F401 (re-export)

_SITE_DIR = Path(__file__).resolve().parent.parent / "compat" / "sglang_site"


class ServerStartError(RuntimeError):
    pass


class ServerRestartLimit(RuntimeError):
    """A server died more often than `server.max_restarts` allows."""


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


class SGLangServer:
    def __init__(self, name: str, model_path: str, port: int, log_path: str,
                 host: str = "127.0.0.1", extra_args: tuple[str, ...] = (),
                 dtype: str = "float32", max_total_tokens: int = 16384,
                 context_length: int | None = None, enable_return_routed_experts: bool = False,
                 threads: int | None = None, enable_metrics: bool = False,
                 hidden_states_dtype: str = "bfloat16"):
        self.name, self.model_path, self.port, self.host = name, model_path, port, host
        self.log_path = str(log_path)
        self.extra_args = tuple(extra_args)
        self.dtype, self.max_total_tokens = dtype, max_total_tokens
        self.context_length = context_length
        self.enable_return_routed_experts = enable_return_routed_experts
        self.threads = threads  # torch/OpenMP threads per server process (None: SGLang's choice)
        self.enable_metrics = enable_metrics  # Prometheus /metrics (the fleet probe's tokens/s)
        # with --enable-return-hidden-states (a teacher of teacher.signal=hidden): the dtype of
        # the binary frames its hidden states are sent in (compat patch_hidden_states_as_frames)
        self.hidden_states_dtype = hidden_states_dtype
        self.proc: subprocess.Popen | None = None
        self.nccl_port: int | None = None  # its torch.distributed port: ours, not SGLang's pick

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def command(self) -> list[str]:
        """The watchdog (owner of the process group) running `sglang.launch_server` on this
        address. SGLang would pick its torch.distributed port at random itself: two servers
        started at once could pick the same one, so the port comes from this process's
        `port_for_later`, which never hands out a port twice."""
        from megatron_opd.listeners import port_for_later

        if self.nccl_port is None:
            self.nccl_port = port_for_later(self.host)
        # --grace 0: stopped by SIGKILL (nothing to save; SGLang's own shutdown takes 6-10 s)
        return [sys.executable, "-m", "megatron_opd.serving.watchdog", "--grace", "0", "--",
                sys.executable, "-m", "sglang.launch_server", "--host", self.host,
                "--port", str(self.port), "--nccl-port", str(self.nccl_port),
                *self.server_args()]

    def new_ports(self) -> None:
        """Other ports for the next start (a port was taken between its pick and the bind)."""
        from megatron_opd.listeners import port_for_later

        self.port, self.nccl_port = port_for_later(self.host), port_for_later(self.host)

    def server_args(self) -> list[str]:
        """`sglang.launch_server` arguments but the address."""
        args = ["--model-path", self.model_path, "--dtype", self.dtype,
                # The KV pool otherwise takes ~70% of RAM per server (GPU-style sizing).
                "--max-total-tokens", str(self.max_total_tokens), "--skip-server-warmup"]
        if not _cuda_available():
            # --sleep-on-idle: an idle CPU server otherwise polls at a full core (measured: 101%
            # vs 2% idle), stealing it from the learner and the other server on the machine.
            args += ["--device", "cpu", "--attention-backend", "torch_native", "--sleep-on-idle"]
        if self.context_length:
            args += ["--context-length", str(self.context_length)]
        if self.enable_return_routed_experts:
            args += ["--enable-return-routed-experts"]
        if self.enable_metrics:
            args += ["--enable-metrics"]
        return args + list(self.extra_args)

    def environment(self) -> dict[str, str]:
        env = dict(os.environ)
        if self.threads:
            env["OMP_NUM_THREADS"] = str(self.threads)
        if not _cuda_available():
            env["SGLANG_USE_CPU_ENGINE"] = "1"
        # compat/sglang_site: the run patches on every device (the scheduler's store listens on
        # --host only, a short server_args log line), the CPU compat where there is no CUDA
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(_SITE_DIR), env.get("PYTHONPATH", "")) if p)
        from megatron_opd.compat.sglang_cpu import HIDDEN_STATES_ENV

        env.pop(HIDDEN_STATES_ENV, None)
        if "--enable-return-hidden-states" in self.server_args():  # frames, not JSON floats
            env[HIDDEN_STATES_ENV] = self.hidden_states_dtype
        env.update(self.socket_env(env))
        return env

    def socket_env(self, env: dict) -> dict[str, str]:
        """gloo/NCCL interfaces (the weight-update group): `lo` for a server on loopback."""
        from megatron_opd.listeners import loopback_socket_env

        return loopback_socket_env(self.host, env)

    def start(self) -> None:
        self.proc = spawn_group(self.command(), self.log_path, self.environment())

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait_ready(self, timeout: float = 300.0) -> None:
        """Block until the server answers a real generation; raise ServerStartError otherwise."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            if not self.alive():
                code = self.proc.returncode if self.proc else None
                raise ServerStartError(f"SGLang server '{self.name}' exited with code {code} "
                                       f"while starting; last lines of {self.log_path}:\n"
                                       + log_tail(self.log_path))
            try:
                url = self.url
                if url and requests.get(f"{url}/health_generate", timeout=10).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(1.0)
        self.stop()
        raise ServerStartError(f"SGLang server '{self.name}' not ready after {timeout:.0f} s; "
                               f"last lines of {self.log_path}:\n" + log_tail(self.log_path))

    def stop(self, timeout: float = 15.0) -> None:
        if self.proc is not None:
            stop_group(self.proc, timeout)

    def __enter__(self) -> "SGLangServer":
        self.start()
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


class RemoteSGLangServer(SGLangServer):
    """A server started through a launcher prefix (e.g. `srun --het-group=1 ...`) on a node this
    process cannot pick ports on: `megatron_opd.serving.serve` picks one there and writes the
    endpoint file (shared filesystem), which `url` reads. A restart asks for the same port."""

    def __init__(self, name: str, model_path: str, endpoint_file: str | Path, log_path: str,
                 launch_prefix: list[str], **kwargs):
        super().__init__(name, model_path, 0, log_path, **kwargs)
        self.endpoint_file = Path(endpoint_file)
        self.launch_prefix = list(launch_prefix)
        self._url: str | None = None

    @property
    def url(self) -> str | None:
        if self._url is None:
            try:
                endpoint = json.loads(self.endpoint_file.read_text())
            except (FileNotFoundError, ValueError):
                return None
            self._url, self.port = endpoint["url"], int(endpoint["port"])
        return self._url

    def socket_env(self, env: dict) -> dict[str, str]:
        return {}  # listens on its node's address (serve.py); the job's environment decides

    def command(self) -> list[str]:
        return [*self.launch_prefix, sys.executable, "-m", "megatron_opd.serving.serve",
                "--endpoint-file", str(self.endpoint_file), "--prefer-port", str(self.port),
                "--", *self.server_args()]

    def new_ports(self) -> None:
        self.port = 0  # serve.py picks another one on the node

    def start(self) -> None:
        self.url  # the previous port, if any, is asked for again
        self.endpoint_file.unlink(missing_ok=True)
        self._url = None
        super().start()


PORT_TAKEN = ("Address already in use", "EADDRINUSE", "address already in use")


def start_servers(servers: list[SGLangServer], timeout: float, attempts: int = 3) -> None:
    """Start `servers` at once and wait until each answers. A server that failed to start
    because one of its ports was taken in between (another process bound it first) is started
    again on other ports, at most `attempts` times; any other failure raises ServerStartError."""
    for s in servers:
        s.start()
    for s in servers:
        for attempt in range(attempts):
            try:
                s.wait_ready(timeout=timeout)
                break
            except ServerStartError as e:
                if attempt + 1 == attempts or not any(m in str(e) for m in PORT_TAKEN):
                    raise
                s.stop(timeout=5.0)
                s.new_ports()
                print(f"[megatron-opd] SGLang server {s.name}: a port was taken while it "
                      f"started; starting it again on port {s.port}", file=sys.stderr, flush=True)
                s.start()


@dataclass
class Probe:
    """What the fleet probe last saw of one server (GET /v1/loads, and /model_info for rollout
    servers)."""

    ok_at: float = 0.0  # last time the server answered its probe (0: not since its (re)start)
    errors: int = 0  # probes that failed once the server had answered (over the run)
    running: int = 0  # requests running on the server
    waiting: int = 0  # requests queued on the server
    gen_tokens_per_s: float = 0.0  # tokens generated per second since the previous probe
    weight_version: int | None = None  # rollout servers: the version they serve
    generated: float | None = None  # sglang:generation_tokens_total at the last probe


class FleetProbe:
    """A thread that probes every server each `interval_s`: GET /v1/loads (the HTTP server and
    the scheduler both answer, and it is what the queue is read from; /health would run a
    generation, and reports 503 after 20 s while a server is paused for a weight update with
    nothing running), GET /metrics where the server runs with --enable-metrics (tokens/s from
    the `sglang:generation_tokens_total` counter: SGLang's own `gen_throughput` is only updated
    every 40 decode steps and stays 0 on short CPU generations) and, for servers named in
    `versioned`, GET /model_info (weight_version). Never blocks the supervision loop."""

    def __init__(self, servers: list[SGLangServer], versioned: set[str] = frozenset(),
                 interval_s: float = 2.0, timeout_s: float = 10.0):
        import requests

        self.servers, self.versioned = list(servers), set(versioned)
        self.interval_s, self.timeout_s = interval_s, timeout_s
        self.seen = {s.name: Probe() for s in self.servers}
        self._lock, self._stop = threading.Lock(), threading.Event()
        self._session = requests.Session()
        self._thread = threading.Thread(target=self._loop, daemon=True, name="fleet-probe")

    def start(self) -> "FleetProbe":
        self._thread.start()
        return self

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=self.timeout_s + 5)

    def get(self, name: str) -> Probe:
        with self._lock:
            return Probe(**vars(self.seen[name]))

    def reset(self, name: str) -> None:
        """The server was (re)started: nothing seen of the new process yet."""
        with self._lock:
            errors = self.seen[name].errors
            self.seen[name] = Probe(errors=errors)

    def _loop(self) -> None:
        while not self._stop.is_set():
            for s in self.servers:
                if self._stop.is_set():
                    return
                if s.alive() and s.url:
                    self._probe(s)
            self._stop.wait(self.interval_s)

    def _probe(self, s: SGLangServer) -> None:
        started = s.pid
        try:
            r = self._session.get(f"{s.url}/v1/loads", timeout=self.timeout_s)
            r.raise_for_status()
            loads = r.json()["loads"]
            version, generated = None, None
            if getattr(s, "enable_metrics", False):
                r = self._session.get(f"{s.url}/metrics", timeout=self.timeout_s)
                r.raise_for_status()
                generated = _counter(r.text, "sglang:generation_tokens_total")
            if s.name in self.versioned:
                r = self._session.get(f"{s.url}/model_info", timeout=self.timeout_s)
                r.raise_for_status()
                version = int(r.json()["weight_version"])
        except Exception:  # noqa: BLE001 (any failure is a failed probe)
            with self._lock:
                if self.seen[s.name].ok_at:  # a server still starting is not failing
                    self.seen[s.name].errors += 1
            return
        if s.pid != started:  # restarted while probed: the answer was the old process's
            return
        now = time.time()
        with self._lock:
            p = self.seen[s.name]
            if generated is None:  # no /metrics: SGLang's own figure
                p.gen_tokens_per_s = sum(float(x.get("gen_throughput", 0.0)) for x in loads)
            elif p.generated is not None and p.ok_at and generated >= p.generated:
                p.gen_tokens_per_s = (generated - p.generated) / max(now - p.ok_at, 1e-6)
            p.generated = generated
            p.ok_at = now
            p.running = sum(int(x.get("num_running_reqs", 0)) for x in loads)
            p.waiting = sum(int(x.get("num_waiting_reqs", 0)) for x in loads)
            p.weight_version = version


def _counter(text: str, name: str) -> float:
    """The sum over labels of Prometheus counter `name` in `text` (0 before it first counts)."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and line[len(name):len(name) + 1] in ("{", " "):
            total += float(line.rsplit(" ", 1)[1])
    return total


class ServerSupervisor:
    """Restart dead servers: same port, same arguments (the rollout server therefore comes back
    with the student init at `--weight-version 0`; the weight publisher reconnects and sends the
    current weights), at most `max_restarts` times per server. `check()` is non-blocking: call it
    from the supervision loop. Every restart is appended to the server's own log, and the counts
    are kept in `counts_path` (JSON {server name: restarts}) for the learner and the summary.
    Clients wait for the restarted server themselves (SGLangClient retries).

    With a `probe` (FleetProbe): a server that answered its probe once since its (re)start and
    then not for `health_timeout_s` (0: never) is treated as dead (killed and restarted). With
    `routers` ({role: SmgRouter}) and `roles` ({server name: role}): a server that died or failed
    its health check is removed from its fleet's router at once and added back once its probe
    answers again and, for a rollout server, it serves the fleet's current weight version (the
    highest version any rollout server was seen serving), so a restarted server never takes
    routed traffic with the init's weights."""

    def __init__(self, servers: list[SGLangServer], max_restarts: int,
                 counts_path: str | Path | None = None, *, probe: FleetProbe | None = None,
                 health_timeout_s: float = 0.0, routers: dict | None = None,
                 roles: dict[str, str] | None = None):
        self.servers, self.max_restarts = list(servers), max_restarts
        self.counts_path = Path(counts_path) if counts_path else None
        self.restarts = {s.name: 0 for s in self.servers}
        self.probe, self.health_timeout_s = probe, health_timeout_s
        self.routers = dict(routers or {})
        self.roles = dict(roles or {})
        self.drained: set[str] = set()  # names of servers out of their router
        self._removal: dict[str, float] = {}  # drained, not yet seen out of the router: asked at
        self.current_version = 0  # highest weight version a rollout server was seen serving
        self._save()

    def check(self) -> list[str]:
        """Restart every server that died (or failed its health check) since the last call;
        drain and rejoin servers behind a router; return the names restarted. Raises
        ServerRestartLimit (naming the server, with its log tail) past the bound."""
        restarted = []
        for s in self.servers:
            if s.alive() and not self._unhealthy(s):
                continue
            self._drain(s)
            if s.alive():  # alive but not answering: treated as dead
                s.stop(timeout=5.0)
                why = f"failed its health check for {self.health_timeout_s:.0f} s; killed"
                died = why
            else:
                code = s.proc.returncode if s.proc else None
                why, died = f"exited with code {code}", f"died (exit code {code})"
            n = self.restarts[s.name]
            if n >= self.max_restarts:
                raise ServerRestartLimit(
                    f"SGLang server {s.name} {died} and was already restarted "
                    f"{n} times (server.max_restarts={self.max_restarts}); last lines of "
                    f"{s.log_path}:\n" + log_tail(s.log_path))
            s.stop(timeout=5.0)  # what is left of its process group (scheduler, detokenizer)
            self.restarts[s.name] = n + 1
            with open(s.log_path, "a") as log:
                log.write(f"\n[megatron-opd] {time.strftime('%Y-%m-%d %H:%M:%S')} SGLang server "
                          f"{s.name} {why}; restart {n + 1}/{self.max_restarts} "
                          f"on port {s.port}\n")
            if self.probe is not None:
                self.probe.reset(s.name)
            s.start()
            print(f"[megatron-opd] SGLang server {s.name} {why}; restarted "
                  f"({n + 1}/{self.max_restarts}, log {s.log_path})", file=sys.stderr, flush=True)
            restarted.append(s.name)
        if restarted:
            self._save()
        self._rejoin()
        return restarted

    def _unhealthy(self, s: SGLangServer) -> bool:
        if self.probe is None or not self.health_timeout_s:
            return False
        ok_at = self.probe.get(s.name).ok_at
        return bool(ok_at) and time.time() - ok_at > self.health_timeout_s

    def _router(self, s: SGLangServer):
        return self.routers.get(self.roles.get(s.name, ""))

    def _drain(self, s: SGLangServer) -> None:
        router = self._router(s)
        if router is None or s.name in self.drained:
            return
        self.drained.add(s.name)
        self._remove(s, router)
        print(f"[megatron-opd] SGLang server {s.name} drained from {router.name}",
              file=sys.stderr, flush=True)

    def _remove(self, s: SGLangServer, router) -> None:
        self._removal[s.name] = time.time()
        try:
            router.remove(s.url)
        except Exception as e:  # noqa: BLE001 (asked again until the router stops listing it)
            print(f"[megatron-opd] could not drain {s.name} from {router.name} yet: {e}",
                  file=sys.stderr, flush=True)

    def _removed(self, s: SGLangServer, router) -> bool:
        """The router applies a removal in the background: a server is out once the router
        stopped listing it (asked again every 10 s until then). Until that, an addition would be
        refused, or seem done and then be undone by the pending removal."""
        if s.name not in self._removal:
            return True
        try:
            if not router.listed(s.url):
                del self._removal[s.name]
                return True
        except Exception:  # noqa: BLE001 (the router restarts: asked again)
            return False
        if time.time() - self._removal[s.name] > 10.0:
            self._remove(s, router)
        return False

    def _rejoin(self) -> None:
        if self.probe is None:
            return
        for s in self.servers:  # the fleet's version: what any rollout server was seen serving
            v = self.probe.get(s.name).weight_version
            if self.roles.get(s.name) == "rollout" and v is not None:
                self.current_version = max(self.current_version, v)
        for s in self.servers:
            if s.name not in self.drained or not s.alive():
                continue
            seen = self.probe.get(s.name)
            if not seen.ok_at:
                continue  # not answering yet
            if self.roles.get(s.name) == "rollout" and (seen.weight_version or 0) < \
                    self.current_version:
                continue  # still the init's weights: the publisher has not reached it yet
            router = self._router(s)
            if not self._removed(s, router):
                continue
            try:
                if router.add(s.url):
                    self.drained.discard(s.name)
                    print(f"[megatron-opd] SGLang server {s.name} rejoined {router.name} "
                          f"(weight version {seen.weight_version})", file=sys.stderr, flush=True)
            except Exception as e:  # noqa: BLE001 (tried again at the next check)
                print(f"[megatron-opd] {s.name} could not rejoin {router.name} yet: {e}",
                      file=sys.stderr, flush=True)

    def stats(self) -> dict:
        """Flat per-server figures for `<run>/fleet_stats.json` (docs/fleets.md lists them)."""
        out: dict = {}
        for s in self.servers:
            key = f"fleet/{s.name}"
            out[f"{key}/restarts"] = self.restarts[s.name]
            out[f"{key}/up"] = int(s.alive() and s.name not in self.drained)
            if self.probe is None:
                continue
            p = self.probe.get(s.name)
            out[f"{key}/queue"] = p.waiting
            out[f"{key}/running"] = p.running
            out[f"{key}/gen_tokens_per_s"] = p.gen_tokens_per_s
            out[f"{key}/errors"] = p.errors
            if s.name in self.probe.versioned:
                out[f"{key}/weight_version"] = p.weight_version
        return out

    def _save(self) -> None:
        if self.counts_path is not None:
            tmp = self.counts_path.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.restarts))
            tmp.replace(self.counts_path)


def write_json_atomic(path: str | Path, data: dict) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data))
    tmp.replace(path)


def server_restarts(path: str | Path) -> int:
    """Total server restarts recorded by a ServerSupervisor at `path` (0 if none)."""
    try:
        return sum(json.loads(Path(path).read_text()).values())
    except (FileNotFoundError, ValueError):
        return 0
