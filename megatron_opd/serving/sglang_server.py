"""Start, watch and stop one SGLang server process (teacher or rollout).

Each server runs in its own process group (SGLang forks a scheduler and a detokenizer), so stop()
can take down the whole group and leave no orphans. The run patches of
megatron_opd/compat/sglang_cpu.py (where the scheduler's store listens, a short server_args log
line) are put on the server's PYTHONPATH, with the CPU compat, which applies only without CUDA.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
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
                 threads: int | None = None):
        self.name, self.model_path, self.port, self.host = name, model_path, port, host
        self.log_path = str(log_path)
        self.extra_args = tuple(extra_args)
        self.dtype, self.max_total_tokens = dtype, max_total_tokens
        self.context_length = context_length
        self.enable_return_routed_experts = enable_return_routed_experts
        self.threads = threads  # torch/OpenMP threads per server process (None: SGLang's choice)
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def command(self) -> list[str]:
        return [sys.executable, "-m", "sglang.launch_server", "--host", self.host,
                "--port", str(self.port), *self.server_args()]

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

    def start(self) -> None:
        self.url  # the previous port, if any, is asked for again
        self.endpoint_file.unlink(missing_ok=True)
        self._url = None
        super().start()


class ServerSupervisor:
    """Restart dead servers: same port, same arguments (the rollout server therefore comes back
    with the student init at `--weight-version 0`; the weight publisher reconnects and sends the
    current weights), at most `max_restarts` times per server. `check()` is non-blocking: call it
    from the supervision loop. Every restart is appended to the server's own log, and the counts
    are kept in `counts_path` (JSON {server name: restarts}) for the learner and the summary.
    Clients wait for the restarted server themselves (SGLangClient retries)."""

    def __init__(self, servers: list[SGLangServer], max_restarts: int,
                 counts_path: str | Path | None = None):
        self.servers, self.max_restarts = list(servers), max_restarts
        self.counts_path = Path(counts_path) if counts_path else None
        self.restarts = {s.name: 0 for s in self.servers}
        self._save()

    def check(self) -> list[str]:
        """Restart every server that died since the last call; return their names. Raises
        ServerRestartLimit (naming the server, with its log tail) past the bound."""
        restarted = []
        for s in self.servers:
            if s.alive():
                continue
            code = s.proc.returncode if s.proc else None
            n = self.restarts[s.name]
            if n >= self.max_restarts:
                raise ServerRestartLimit(
                    f"SGLang server {s.name} died (exit code {code}) and was already restarted "
                    f"{n} times (server.max_restarts={self.max_restarts}); last lines of "
                    f"{s.log_path}:\n" + log_tail(s.log_path))
            s.stop(timeout=5.0)  # what is left of its process group (scheduler, detokenizer)
            self.restarts[s.name] = n + 1
            with open(s.log_path, "a") as log:
                log.write(f"\n[megatron-opd] {time.strftime('%Y-%m-%d %H:%M:%S')} SGLang server "
                          f"{s.name} exited with code {code}; restart {n + 1}/{self.max_restarts} "
                          f"on port {s.port}\n")
            s.start()
            print(f"[megatron-opd] SGLang server {s.name} exited with code {code}; restarted "
                  f"({n + 1}/{self.max_restarts}, log {s.log_path})", file=sys.stderr, flush=True)
            restarted.append(s.name)
        if restarted:
            self._save()
        return restarted

    def _save(self) -> None:
        if self.counts_path is not None:
            tmp = self.counts_path.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.restarts))
            tmp.replace(self.counts_path)


def server_restarts(path: str | Path) -> int:
    """Total server restarts recorded by a ServerSupervisor at `path` (0 if none)."""
    try:
        return sum(json.loads(Path(path).read_text()).values())
    except (FileNotFoundError, ValueError):
        return 0
