"""Where sockets listen (issue 14 item 6; docs/security.md): a TCPStore server listens on the
host it is given, also the store of the learner's torchrun agent. The quickstart's whole
process tree is checked in tests/test_e2e_quickstart.py."""

import json
import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import torch.distributed as dist

from megatron_opd.listeners import (LATER_PORTS, is_loopback, loopback_socket_env,
                                     port_for_later, tcp_store)
from megatron_opd.procs import free_port
from tests.net_listeners import beyond_loopback, listeners

ROOT = Path(__file__).resolve().parents[1]


def test_upstream_store_listens_everywhere_ours_on_its_host():
    me = [os.getpid()]
    timeout = timedelta(seconds=30)
    upstream = dist.TCPStore("127.0.0.1", 0, 1, True, timeout)
    # what the patches are for: upstream ignores the host name (if this starts failing, torch
    # binds the host it is given and the patches can go)
    assert any(port == upstream.port for _, port, _ in beyond_loopback(me))
    del upstream
    ours = tcp_store("127.0.0.1", 0, 2, is_master=True, timeout=timeout, wait_for_workers=False)
    bound = {port: addr for addr, port, _ in listeners(me)}
    assert bound[ours.port] == "127.0.0.1"
    client = tcp_store("127.0.0.1", ours.port, 2, is_master=False, timeout=timeout)
    client.set("k", "v")  # a working store, not just a socket
    assert ours.get("k") == b"v"
    v6 = tcp_store("::1", 0, 1, is_master=True, timeout=timeout)
    assert {port: addr for addr, port, _ in listeners(me)}[v6.port] == "::1"
    assert not beyond_loopback(me)


def test_loopback_names_lo_for_gloo_and_nccl_unless_set():
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("10.0.0.1") and not is_loopback("0.0.0.0") and not is_loopback("n1")
    assert loopback_socket_env("127.0.0.1", {}) == {"GLOO_SOCKET_IFNAME": "lo",
                                                    "NCCL_SOCKET_IFNAME": "lo"}
    assert loopback_socket_env("127.0.0.1", {"NCCL_SOCKET_IFNAME": "ib0"}) == {
        "GLOO_SOCKET_IFNAME": "lo"}
    assert loopback_socket_env("10.0.0.1", {}) == {}  # a job's address: its environment decides


_WORKER = """
import json, os, sys
sys.path.insert(0, {root!r})
import torch.distributed as dist
from megatron_opd.listeners import loopback_socket_env
from tests.net_listeners import listeners, process_tree

os.environ.update(loopback_socket_env(os.environ["MASTER_ADDR"]))
dist.init_process_group("gloo")
dist.barrier()  # every rank's gloo pairs are up
if dist.get_rank() == 0:  # the agent (our parent) and every rank
    with open({out!r}, "w") as f:
        json.dump(listeners(process_tree(os.getppid())), f)
dist.barrier()
dist.destroy_process_group()
"""


def test_learner_torchrun_store_listens_on_master_addr(tmp_path):
    """The learner's torchrun line (launch/fleet.py) runs through compat/torchrun.py: the
    agent's rendezvous store and every rank's gloo listen on loopback only."""
    from megatron_opd.launch.fleet import torchrun_command

    out, worker = tmp_path / "listeners.json", tmp_path / "worker.py"
    worker.write_text(_WORKER.format(root=str(ROOT), out=str(out)))
    port = free_port()
    cmd = torchrun_command(1, 2, 0, "127.0.0.1", port, tmp_path)
    assert cmd[1:3] == ["-m", "megatron_opd.compat.torchrun"]
    cmd = cmd[:cmd.index("-m", 3)] + [str(worker)]
    env = {k: v for k, v in os.environ.items() if not k.endswith("_SOCKET_IFNAME")}
    r = subprocess.run(cmd, cwd=ROOT, env={**env, "OMP_NUM_THREADS": "1"}, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    found = json.loads(out.read_text())
    assert any(p == port for _, p, _ in found), found  # the agent's store is among them
    assert len(found) >= 3, found  # the store and each rank's gloo listener
    assert all(addr == "127.0.0.1" for addr, _, _ in found), found


def test_ports_for_later_are_never_handed_out_by_the_kernel():
    """The launcher picks the learner's and servers' ports long before they bind them; gloo binds
    port 0 dozens of times in between: picked ports lie below the kernel's ephemeral range."""
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    ports = {port_for_later() for _ in range(20)}
    assert all(LATER_PORTS[0] <= p <= min(LATER_PORTS[1], low - 1) for p in ports), ports
    assert len(ports) > 10  # random, not one port over and over
    import socket

    with socket.socket() as s:  # free indeed
        s.bind(("127.0.0.1", ports.pop()))
