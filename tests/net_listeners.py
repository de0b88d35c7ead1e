"""Which TCP sockets a set of processes listens on, read from /proc (no `ss` needed):
/proc/net/tcp and /proc/net/tcp6 list LISTEN sockets with their inode, /proc/<pid>/fd links
name the inodes a process holds."""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path

import psutil

LISTEN = "0A"


def process_tree(pid: int) -> list[int]:
    """`pid` and all its descendants that are still there."""
    try:
        root = psutil.Process(pid)
        return [root.pid] + [p.pid for p in root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def kill_tree(pid: int, timeout: float = 30) -> None:
    """SIGKILL `pid` and every process below it (some run in sessions of their own), and wait
    until they are gone."""
    import signal

    try:
        root = psutil.Process(pid)
        victims = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for p in victims:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(victims, timeout=timeout)


def _socket_inodes(pids) -> dict[str, int]:
    inodes = {}
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except (FileNotFoundError, PermissionError, ProcessLookupError):
            continue
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes[target[8:-1]] = pid
    return inodes


def _address(hex_addr: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    raw = bytes.fromhex(hex_addr)
    if len(raw) == 4:
        return ipaddress.IPv4Address(raw[::-1])  # one little-endian 32-bit word
    return ipaddress.IPv6Address(b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4)))


def listeners(pids) -> list[tuple[str, int, int]]:
    """(address, port, pid) of every TCP socket in LISTEN state held by `pids`."""
    inodes = _socket_inodes(pids)
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state == LISTEN and inode in inodes:
                addr, port = local.split(":")
                found.append((str(_address(addr)), int(port, 16), inodes[inode]))
    return found


def is_loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    mapped = getattr(ip, "ipv4_mapped", None)
    return ip.is_loopback or (mapped is not None and mapped.is_loopback)


def beyond_loopback(pids) -> list[tuple[str, int, str]]:
    """Listeners of `pids` not bound to a loopback address: (address, port, process name)."""
    out = []
    for addr, port, pid in listeners(pids):
        if not is_loopback(addr):
            try:
                name = " ".join(psutil.Process(pid).cmdline())[:120]
            except psutil.NoSuchProcess:
                name = str(pid)
            out.append((addr, port, name))
    return out
