"""Where a run's sockets listen (docs/security.md lists every one).

A run on one machine binds every listener to loopback; a multi-node run binds to the address its
site names (the Slurm job's `MEGATRON_OPD_ADDR` or what the node's hostname resolves to), never
to all interfaces by default. Two things in torch listen on all interfaces unless told otherwise:

- a `TCPStore` server (torch.distributed rendezvous: the weight-sync group's store, the
  learner's torchrun agent (compat/torchrun.py), SGLang's `init_process_group`
  (compat/sglang_cpu.py)) binds `*` whatever host name it is given; `tcp_store` binds a socket
  to that host first and hands it over (`master_listen_fd`). A learner of one rank needs no
  store port at all (an in-process HashStore, learner/parallel.py);
- gloo and NCCL listen on the interface `GLOO_SOCKET_IFNAME` / `NCCL_SOCKET_IFNAME` names (else
  gloo takes the hostname's address, NCCL the first non-loopback interface);
  `loopback_socket_env` names `lo` for a run on one machine.

Ports one process picks and another binds later come from `port_for_later`.
"""

from __future__ import annotations

import ipaddress
import os
import socket
from datetime import timedelta

ALL_INTERFACES = ("", "*", "0.0.0.0", "::")


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 and `localhost`."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def listening_socket(host: str, port: int, backlog: int = 2048) -> socket.socket:
    """A TCP socket bound to `host:port` (port 0: any free one), listening."""
    family, _, _, _, addr = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as torch's own server does
        sock.bind(addr)
        sock.listen(backlog)
    except BaseException:
        sock.close()
        raise
    return sock


def tcp_store(host: str, port: int, world_size: int | None = None, is_master: bool = False,
              timeout: timedelta = timedelta(seconds=300), wait_for_workers: bool = True,
              multi_tenant: bool = False, use_libuv: bool = True):
    """`torch.distributed.TCPStore`, whose server (`is_master`) listens on `host` only (upstream
    binds every interface whatever `host` says). `host` naming all interfaces keeps upstream's
    behaviour. Same arguments as TCPStore (positional order too)."""
    import torch.distributed as dist

    kwargs = dict(wait_for_workers=wait_for_workers, multi_tenant=multi_tenant,
                  use_libuv=use_libuv)
    if not is_master or host in ALL_INTERFACES:
        return dist.TCPStore(host, port, world_size, is_master, timeout, **kwargs)
    fd = listening_socket(host, port).detach()  # the store owns (and closes) the socket
    try:
        return dist.TCPStore(host, port, world_size, True, timeout, master_listen_fd=fd, **kwargs)
    except BaseException:
        os.close(fd)
        raise


def loopback_socket_env(host: str, env: dict | None = None) -> dict[str, str]:
    """`GLOO_SOCKET_IFNAME=lo` and `NCCL_SOCKET_IFNAME=lo` when `host` is loopback (a run on one
    machine), unless `env` (default: this process's) already names an interface."""
    env = os.environ if env is None else env
    if not is_loopback(host):
        return {}
    return {k: "lo" for k in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME") if not env.get(k)}


LATER_PORTS = (10000, 21999)  # below the kernel's ephemeral range; SGLang picks 22000-29999
_HANDED_OUT: set[int] = set()  # ports this process gave out: never twice (servers start at once)


def port_for_later(host: str = "127.0.0.1", attempts: int = 64) -> int:
    """A free port for a socket another process binds later (the learner's channels and
    weight-sync rendezvous, the servers' HTTP and torch.distributed ports): below the kernel's
    ephemeral range, so no process that binds port 0 in between (gloo listens on dozens) is
    handed it, and never one this process handed out before (two servers started at once get
    different ports even before either binds). The kernel's choice if that range is unavailable."""
    port = _pick_port(host, attempts)
    _HANDED_OUT.add(port)
    return port


def _pick_port(host: str, attempts: int) -> int:
    import random

    from megatron_opd.procs import free_port

    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            ephemeral_low = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        ephemeral_low = 32768
    low, high = LATER_PORTS[0], min(LATER_PORTS[1], ephemeral_low - 1)
    if high - low + 1 >= attempts:
        bind_host = "0.0.0.0" if host in ALL_INTERFACES else host.strip("[]")
        for port in random.sample(range(low, high + 1), attempts):
            if port in _HANDED_OUT:
                continue
            try:
                with socket.socket(socket.getaddrinfo(bind_host, port)[0][0]) as s:
                    s.bind((bind_host, port))
                return port
            except OSError:
                continue
    return free_port(host)
