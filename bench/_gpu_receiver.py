"""The receiving end of the GPU suite's weight-sync check (bench/gpu_suite.py part 3; not meant
to be run by hand).

SGLang cannot travel to the lent GPU machines (its CUDA kernels are far over the 64 MiB that may
be carried), so this process stands in for one SGLang server with one rank: it answers the HTTP
routes `DistributedWeightPublisher` and `SGLangClient` call (SGLang's native API names and bodies),
joins the update group the way SGLang does (rendezvous store wrapped in PrefixStore(group_name),
rank `rank_offset`) and receives each announced bucket as SGLang's model runner does: a fresh
buffer per tensor, every broadcast issued asynchronously, then waited for. It keeps the newest
tensor of every name (its "model"). Extra routes for the suite: /raw_receive (the baseline: the
same buckets without HTTP per bucket, each acknowledged by a one-element broadcast back),
/weights_checksum (bench/_gpu_common.checksum of every tensor held) and, for the dry run,
/dump_weights (a safetensors file, compared exactly by the sender). JSON bodies only.

Prints `PORT <n>` once it listens on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path[:0] = [str(BENCH.parent), str(BENCH)]

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402


class Receiver:
    def __init__(self, device: str):
        self.device = device
        self.groups: dict[str, object] = {}
        self.weights: dict[str, torch.Tensor] = {}
        self.version = "0"
        self.calls: dict[str, int] = {}
        self.raw_thread: threading.Thread | None = None
        self.raw_error: str | None = None

    # ---- SGLang's routes (the bodies SGLangClient sends)
    def init_weights_update_group(self, b: dict) -> dict:
        from torch.distributed.distributed_c10d import (Backend, PrefixStore,
                                                        _new_process_group_helper, _world)

        timeout = timedelta(seconds=b.get("timeout_s", 300))
        store = dist.TCPStore(b["master_address"], int(b["master_port"]), int(b["world_size"]),
                              is_master=False, timeout=timeout)
        store = PrefixStore(b["group_name"], store)
        group, _ = _new_process_group_helper(
            int(b["world_size"]), int(b["rank_offset"]), [], Backend(b["backend"]), store,
            group_name=b["group_name"], backend_options=None, timeout=timeout)
        _world.pg_group_ranks[group] = {i: i for i in range(int(b["world_size"]))}
        self.groups[b["group_name"]] = group
        return {"success": True, "message": ""}

    def destroy_weights_update_group(self, b: dict) -> dict:
        group = self.groups.pop(b["group_name"], None)
        if group is None:
            return {"success": False, "message": f"no group {b['group_name']}"}
        dist.destroy_process_group(group)
        return {"success": True, "message": ""}

    def update_weights_from_distributed(self, b: dict) -> dict:
        group = self.groups[b["group_name"]]
        bufs = [torch.empty(shape, dtype=getattr(torch, dtype), device=self.device)
                for dtype, shape in zip(b["dtypes"], b["shapes"])]
        for work in [dist.broadcast(t, src=0, group=group, async_op=True) for t in bufs]:
            work.wait()
        if self.device != "cpu":
            torch.cuda.synchronize()
        self.weights.update(zip(b["names"], bufs))
        if b.get("weight_version") is not None:
            self.version = str(b["weight_version"])
        return {"success": True, "message": ""}

    def raw_receive(self, b: dict) -> dict:
        """Start receiving `repeats` x the buckets (lists of [dtype, shape]) in a thread; after
        each bucket, broadcast one element back (src 1) so the sender knows it arrived."""
        group = self.groups[b["group_name"]]

        def run():
            try:
                ack = torch.ones(1, device=self.device)
                for _ in range(int(b["repeats"])):
                    for bucket in b["buckets"]:
                        bufs = [torch.empty(s, dtype=getattr(torch, d), device=self.device)
                                for d, s in bucket]
                        for work in [dist.broadcast(t, src=0, group=group, async_op=True)
                                     for t in bufs]:
                            work.wait()
                        dist.broadcast(ack, src=1, group=group)
            except Exception as e:  # reported by /raw_status
                self.raw_error = f"{type(e).__name__}: {e}"

        self.raw_thread = threading.Thread(target=run, daemon=True)
        self.raw_thread.start()
        return {"success": True, "message": ""}

    def raw_status(self, b: dict) -> dict:
        if self.raw_thread is not None:
            self.raw_thread.join(timeout=float(b.get("timeout_s", 60)))
        done = self.raw_thread is not None and not self.raw_thread.is_alive()
        return {"success": done and self.raw_error is None, "message": self.raw_error or ""}

    def weights_checksum(self, b: dict) -> dict:
        from _gpu_common import checksum

        return {"version": self.version,
                "checksums": {n: checksum(t) for n, t in self.weights.items()}}

    def dump_weights(self, b: dict) -> dict:
        from safetensors.torch import save_file

        save_file({n: t.cpu() for n, t in self.weights.items()}, b["path"])
        return {"success": True, "message": ""}

    def ok(self, b: dict) -> dict:
        return {"success": True, "message": ""}

    POST = {"init_weights_update_group", "destroy_weights_update_group",
            "update_weights_from_distributed", "raw_receive", "raw_status", "weights_checksum",
            "dump_weights", "pause_generation", "continue_generation", "begin_weight_update",
            "end_weight_update", "abort_request", "flush_cache"}


def serve(receiver: Receiver) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        def _reply(self, code: int, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            name = self.path.strip("/")
            receiver.calls[name] = receiver.calls.get(name, 0) + 1
            if name == "model_info":
                return self._reply(200, {"weight_version": receiver.version})
            if name in ("health", "health_generate"):
                return self._reply(200, {})
            if name == "server_info":
                return self._reply(200, {"disable_radix_cache": True, "calls": receiver.calls})
            self._reply(404, {"error": f"no route {name}"})

        def do_POST(self):
            name = self.path.strip("/")
            receiver.calls[name] = receiver.calls.get(name, 0) + 1
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
            if name not in Receiver.POST:
                return self._reply(404, {"error": f"no route {name}"})
            try:
                self._reply(200, getattr(receiver, name, receiver.ok)(body))
            except Exception as e:
                self._reply(500, {"error": f"{type(e).__name__}: {e}"})

        def log_message(self, *args):  # quiet: the suite's log is its output
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    return server


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()

    from megatron_opd.listeners import loopback_socket_env
    import os

    os.environ.update(loopback_socket_env("127.0.0.1"))
    if args.device != "cpu":
        torch.cuda.set_device(0)
    server = serve(Receiver(args.device))
    print(f"PORT {server.server_address[1]}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
