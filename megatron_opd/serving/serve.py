"""Start one SGLang server on whatever node Slurm put this process on, and say where it listens.

    python -m megatron_opd.serving.serve --endpoint-file F [--prefer-port P] -- <launch_server args>

The job driver cannot know a free port on another node, so this wrapper picks one there (the
previous port when it is free again: a restarted server keeps its address, so clients and the
weight publisher find it where it was), writes `{"url", "host", "port", "pid"}` to the endpoint
file on the shared filesystem, then replaces itself with `sglang.launch_server` listening on that
address only (the pid, and so the Slurm step, stay the same; docs/security.md).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
from pathlib import Path

from megatron_opd.procs import free_port


def advertised_address() -> str:
    """The address other nodes reach this one at: MEGATRON_OPD_ADDR when set (e.g. the
    InfiniBand interface's address), else what this node's hostname resolves to."""
    return os.environ.get("MEGATRON_OPD_ADDR") or socket.gethostbyname(socket.gethostname())


def pick_port(host: str, prefer: int = 0) -> int:
    """`prefer` when it is free on `host`, else any free port there."""
    if prefer:
        with socket.socket() as s:
            try:
                s.bind((host, prefer))
                return prefer
            except OSError:
                pass
    return free_port(host)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if "--" not in argv:
        sys.exit("serve: expected `-- <sglang.launch_server arguments>`")
    split = argv.index("--")
    p = argparse.ArgumentParser(prog="megatron_opd.serving.serve")
    p.add_argument("--endpoint-file", required=True, type=Path)
    p.add_argument("--prefer-port", type=int, default=0)
    args = p.parse_args(argv[:split])
    host = advertised_address()
    port = pick_port(host, args.prefer_port)
    tmp = args.endpoint_file.with_suffix(".tmp")
    tmp.write_text(json.dumps({"url": f"http://{host}:{port}", "host": host, "port": port,
                               "pid": os.getpid(), "node": socket.gethostname()}))
    tmp.replace(args.endpoint_file)
    command = [sys.executable, "-m", "sglang.launch_server", *argv[split + 1:],
               "--host", host, "--port", str(port)]
    os.execv(sys.executable, command)


if __name__ == "__main__":
    main()
