"""Start, watch and stop one SGLang server process (teacher or rollout).

Each server runs in its own process group (SGLang forks a scheduler and a detokenizer), so stop()
can take down the whole group and leave no orphans. On a CPU-only machine the CPU compat is put on
the server's PYTHONPATH (see megatron_opd/compat/sglang_cpu.py); on GPUs nothing is patched.
"""

from __future__ import annotations

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
        args = [sys.executable, "-m", "sglang.launch_server", "--model-path", self.model_path,
                "--host", self.host, "--port", str(self.port), "--dtype", self.dtype,
                # The KV pool otherwise takes ~70% of RAM per server (GPU-style sizing).
                "--max-total-tokens", str(self.max_total_tokens), "--skip-server-warmup"]
        if not _cuda_available():
            args += ["--device", "cpu", "--attention-backend", "torch_native"]
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
            env["PYTHONPATH"] = os.pathsep.join(
                p for p in (str(_SITE_DIR), env.get("PYTHONPATH", "")) if p)
        return env

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
                if requests.get(f"{self.url}/health_generate", timeout=10).status_code == 200:
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
