"""Where a run's processes find each other, written by the launcher into the run directory.

The same entry points run embedded (one machine, `megatron-opd train`) and under Slurm; only who
writes this file differs. Every field is a plain string or int, so it is JSON on disk.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path


@dataclass
class RunWiring:
    run_dir: str
    rollout_urls: list[str]
    teacher_urls: list[str]
    samples_endpoint: str  # learner binds a SampleServer (ROUTER) here; the orchestrator connects
    control_endpoint: str  # learner binds a PUB socket here; the orchestrator SUBscribes
    teacher_dir: str  # prepared models (HF format), for their tokenizer/task ids
    student_dir: str
    weight_sync_master_addr: str = "127.0.0.1"
    weight_sync_master_port: int = 0
    rollout_server_world_size: int = 1  # ranks (GPUs) per rollout server: its weight-sync share
    offline_store: str = ""  # teacher.mode=offline: the store the orchestrator reads samples from
    secret_file: str = ""  # run secret for the HMAC on every ZeroMQ message ("": none, loopback only)
    # The smg router in front of a fleet of several servers ("": no router: one server, or
    # server.router=client). Generation, scoring and evaluation go through it; weight updates
    # and the interrupt gate talk to every server directly (rollout_urls).
    rollout_router_url: str = ""
    teacher_router_url: str = ""
    # Several teachers (teacher.teachers): each one's servers and its router ("": none), by
    # teacher name; teacher_urls then lists every teacher server. Empty with one teacher.
    teacher_fleets: dict[str, list[str]] = field(default_factory=dict)
    teacher_fleet_routers: dict[str, str] = field(default_factory=dict)

    def rollout_endpoint(self) -> list[str]:
        """Where generation and evaluation requests go: [the router] or every server's URL (the
        client round-robins over them)."""
        return [self.rollout_router_url] if self.rollout_router_url else list(self.rollout_urls)

    def teacher_endpoint(self) -> list[str]:
        """Where scoring requests go: [the router] or every teacher server's URL."""
        return [self.teacher_router_url] if self.teacher_router_url else list(self.teacher_urls)

    def rollout_client(self, server_cfg, **kwargs):
        """The client for generation and evaluation: through the router (one sequence per
        request: serving/router.RoutedClient) or round robin over the servers (fleet_client)."""
        return _client(self.rollout_router_url, self.rollout_urls, server_cfg, **kwargs)

    def teacher_client(self, server_cfg, **kwargs):
        """The client for scoring (as rollout_client)."""
        return _client(self.teacher_router_url, self.teacher_urls, server_cfg, **kwargs)

    def teacher_clients(self, server_cfg, **kwargs) -> dict:
        """{teacher name: the client for its scoring} (serving/teachers.TeacherRouter)."""
        from megatron_opd.serving.teachers import SINGLE

        if not self.teacher_fleets:
            return {SINGLE: self.teacher_client(server_cfg, **kwargs)}
        return {name: _client(self.teacher_fleet_routers.get(name, ""), urls, server_cfg,
                              **kwargs) for name, urls in self.teacher_fleets.items()}

    def teacher_servers(self) -> dict[str, list[str]]:
        """{teacher name: its servers' URLs} (checks that ask every server)."""
        from megatron_opd.serving.teachers import SINGLE

        return {k: list(v) for k, v in self.teacher_fleets.items()} or \
            {SINGLE: list(self.teacher_urls)}

    def save(self, path: str | Path) -> None:
        tmp = Path(str(path) + ".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2))
        tmp.replace(path)

    @classmethod
    def load(cls, path: str | Path) -> "RunWiring":
        return cls(**json.loads(Path(path).read_text()))


def _client(router: str, urls: list[str], server_cfg, **kwargs):
    if router:
        from megatron_opd.serving.router import routed_client

        return routed_client(router, server_cfg, **kwargs)
    from megatron_opd.serving.sglang_client import fleet_client

    return fleet_client(urls, server_cfg, **kwargs)
