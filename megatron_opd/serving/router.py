"""SGLang's model gateway (`smg`, PyPI package smg 1.13) in front of a fleet of SGLang servers.

    smg launch --host H --port P --worker-urls URL... --policy POLICY

One router per fleet of more than one server (`server.router=smg`); clients send generation and
scoring to it, and it picks a worker by `server.router_policy` (cache_aware, least_load,
round_robin, power_of_two, random) and re-sends a request whose worker failed to another one.
Its worker API (smg 1.13) is how the supervisor drains a dead server and lets it rejoin:
`GET /workers` (id, url, is_healthy per worker), `DELETE /workers/{id}`, `POST /workers
{"url"}`; both changes are queued and applied in the background (measured: removal ~5 s, addition
~2 s), and an addition while the removal of the same URL is pending is refused (409), so the
caller polls `listed()` and tries again. The first health checks can fail (503) while smg
registers its workers: `wait_ready` polls the worker list, never a fixed sleep.

The router runs in its own process group under the watchdog (megatron_opd/serving/watchdog.py),
like the servers: it dies with the launcher.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import requests

from megatron_opd.errors import RunFailed
from megatron_opd.procs import log_tail, spawn_group, stop_group


class RouterError(RunFailed):
    """The router did not start, or refused a change of its workers."""


def smg_executable() -> str:
    """`smg` next to this Python (the run's environment), else on PATH."""
    here = Path(sys.executable).parent / "smg"
    return str(here) if here.exists() else "smg"


class SmgRouter:
    def __init__(self, name: str, worker_urls: list[str], policy: str, port: int, log_path: str,
                 host: str = "127.0.0.1"):
        self.name, self.worker_urls, self.policy = name, list(worker_urls), policy
        self.host, self.port, self.log_path = host, port, str(log_path)
        self.proc: subprocess.Popen | None = None
        self._session = requests.Session()
        # smg also serves Prometheus metrics, on every interface at port 29000 unless told:
        # bound to the router's address, on a port of its own (two routers in a run)
        from megatron_opd.listeners import port_for_later

        self.metrics_port = port_for_later(host)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def command(self, worker_urls: list[str] | None = None) -> list[str]:
        urls = self.worker_urls if worker_urls is None else worker_urls
        return [sys.executable, "-m", "megatron_opd.serving.watchdog", "--",
                smg_executable(), "launch", "--host", self.host, "--port", str(self.port),
                "--worker-urls", *urls, "--policy", self.policy, "--log-level", "warn",
                "--prometheus-host", self.host, "--prometheus-port", str(self.metrics_port)]

    def start(self, worker_urls: list[str] | None = None) -> None:
        self.proc = spawn_group(self.command(worker_urls), self.log_path)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc is not None:
            stop_group(self.proc, timeout)

    def wait_ready(self, timeout: float, expect: list[str] | None = None) -> None:
        """Block until the router lists every URL of `expect` (default: its workers) as
        healthy; raise RouterError (with its log tail) after `timeout` seconds or if it exits."""
        expect = self.worker_urls if expect is None else expect
        deadline = time.time() + timeout
        while True:
            if not self.alive():
                raise RouterError(f"router {self.name} exited with code {self.proc.returncode} "
                                  f"while starting; last lines of {self.log_path}:\n"
                                  + log_tail(self.log_path))
            try:
                healthy = {u for u, ok in self.workers().items() if ok}
                if set(expect) <= healthy:
                    return
            except (requests.RequestException, ValueError, KeyError):
                pass
            if time.time() >= deadline:
                self.stop()
                raise RouterError(f"router {self.name} did not list {expect} as healthy after "
                                  f"{timeout:.0f} s; last lines of {self.log_path}:\n"
                                  + log_tail(self.log_path))
            time.sleep(0.2)

    def _workers(self) -> list[dict]:
        r = self._session.get(f"{self.url}/workers", timeout=5)
        r.raise_for_status()
        return r.json()["workers"]

    def workers(self) -> dict[str, bool]:
        """{worker url: healthy} as the router lists them now."""
        return {w["url"]: bool(w.get("is_healthy")) for w in self._workers()}

    def listed(self, url: str) -> bool:
        return url in self.workers()

    def remove(self, url: str) -> None:
        """Queue the removal of the worker at `url` (no-op if not listed)."""
        for w in self._workers():
            if w["url"] == url:
                r = self._session.delete(f"{self.url}/workers/{w['id']}", timeout=5)
                if r.status_code not in (200, 202, 404):
                    raise RouterError(f"{self.name}: removing {url}: HTTP {r.status_code}: "
                                      f"{r.text[:300]}")

    def add(self, url: str) -> bool:
        """Queue the worker at `url`; True once it is listed. False while a removal of it is
        still pending (smg answers 409) or the addition is not applied yet: call again."""
        if self.listed(url):
            return True
        r = self._session.post(f"{self.url}/workers", json={"url": url}, timeout=5)
        if r.status_code == 409:
            return False
        if r.status_code not in (200, 201, 202):
            raise RouterError(f"{self.name}: adding {url}: HTTP {r.status_code}: {r.text[:300]}")
        return self.listed(url)


def routed_client(url: str, server_cfg, **kwargs):
    """The client of a fleet behind an smg router at `url` (same retries as `fleet_client`)."""
    return RoutedClient(url, timeout=server_cfg.request_timeout_s,
                        retry_timeout_s=server_cfg.start_timeout_s + server_cfg.request_timeout_s,
                        **kwargs)


def _client_base():
    from megatron_opd.serving.sglang_client import SGLangClient

    return SGLangClient


class RoutedClient(_client_base()):
    """SGLangClient for an smg router: one sequence per request, sent concurrently. smg parses a
    /generate body into its own typed request (smg 1.13), which refuses a list of
    `logprob_start_len` (HTTP 422: "expected i32"), so batched scoring cannot pass as one
    request; one sequence per request also lets the router place each sequence by its own
    prefix and load. Results come back in the order of the inputs; each request is retried by
    the base client (a worker that died: the router, then the client, re-issue it whole)."""

    max_parallel = 32
    _PER_SEQUENCE = ("sampling_params", "logprob_start_len", "rid", "top_logprobs_num")

    def _post_retrying(self, path, payload, check=None):
        """A one-sequence body in SGLang's single-request form (a flat `input_ids`, one value
        per field), which is what smg's typed request accepts."""
        ids = payload.get("input_ids")
        if path == "generate" and isinstance(ids, list) and len(ids) == 1 and \
                isinstance(ids[0], list):
            payload = dict(payload, input_ids=ids[0])
            for key in self._PER_SEQUENCE:
                if isinstance(payload.get(key), list) and len(payload[key]) == 1:
                    payload[key] = payload[key][0]
        return super()._post_retrying(path, payload, check)

    def _each(self, n: int, one):
        from concurrent.futures import ThreadPoolExecutor

        if n <= 1:
            return [one(i) for i in range(n)]
        with ThreadPoolExecutor(max_workers=min(n, self.max_parallel)) as pool:
            return list(pool.map(one, range(n)))

    def generate(self, input_ids, sampling_params, *, rid=None, **kwargs):
        params = sampling_params if isinstance(sampling_params, list) \
            else [sampling_params] * len(input_ids)
        base = super().generate
        return self._each(len(input_ids), lambda i: base(
            [input_ids[i]], params[i], rid=None if rid is None else [rid[i]], **kwargs)[0])

    def score(self, input_ids, *, start, **kwargs):
        base = super().score
        return self._each(len(input_ids),
                          lambda i: base([input_ids[i]], start=[start[i]], **kwargs)[0])
