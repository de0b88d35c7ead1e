"""The prepared GPU check (issue 17): one command for a lent GPU machine, ≤ 8 minutes of wall time.

    bash bench/gpu_suite.sh              # on the GPU machine (docs/gpu.md: how, through the tool)
    bash bench/gpu_suite.sh --dry-run    # anywhere: same code path, CPU-sized shapes, gloo

Parts, each in its own processes with its own time budget; a part that fails or runs out of time
is reported and the next one runs:
1. wheels: install `.whl/*.whl` (bench/gpu_wheels.sh: megatron-core, pyzmq for CPython 3.12)
   into a scratch site directory put first on the workers' PYTHONPATH; wheels this interpreter
   cannot install (the dry run on another Python) are listed, not installed. Then the versions
   the workers will import.
2. learner: bench/_gpu_learner.py, the learner step in bf16 with megatron DDP + distributed
   optimizer on a Qwen3-30B-A3B slice (real hidden, experts, top-k, FFN, vocabulary; as many
   layers as `megatron-opd plan`'s memory model fits on the GPU): step time, tokens/s, MFU
   (model FLOPs from plan's parameter counts over the datasheet's dense bf16 peak; in the dry run
   over a matmul measured in the same run), a raw matmul baseline, peak memory vs plan's estimate.
3. nccl: bench/_gpu_publish.py + bench/_gpu_receiver.py, two processes on the one GPU: the
   learner's DistributedWeightPublisher sends the slice's HF weights in the real config's buckets
   to a receiver speaking SGLang's weight-update routes; ratio to a raw broadcast of the same
   bytes; checksums of every received tensor (dry run: exact equality). NCCL refuses two ranks on
   one GPU ("Duplicate GPU detected", NCCL >= 2.5): each process gets its own NCCL_HOSTID, so NCCL
   sees two hosts and moves the bytes through its socket transport on loopback (both the publish
   and the baseline: the ratio compares like with like; absolute GB/s are not NVLink's).
4. fp8: bf16 (TE layers) vs each FP8 recipe the card supports, only where `import
   transformer_engine` works; otherwise skipped with the import's error.
   gpu_tests: pytest tests/test_gpu_metrics.py (real NVML readings checked against torch's CUDA
   view when a GPU is present).
5. The last line of output is one JSON object with every figure and each skipped part's reason.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
WHEELS = ROOT / ".whl"
FP8_MODES = "bfloat16-te,fp8-delayed,fp8-tensorwise,fp8-blockwise,fp8-mxfp8"
# Seconds per part on the GPU (the whole suite stays under 8 minutes: 470 s with FP8 skipped).
BUDGET_S = {"wheels": 45, "learner": 210, "nccl": 120, "fp8": 150, "gpu_tests": 60}
TOTAL_S = 470


class Suite:
    def __init__(self, dry_run: bool, work: Path, total_s: float, wheels: Path = WHEELS):
        self.dry_run, self.work, self.wheels = dry_run, work, wheels
        self.deadline = time.monotonic() + total_s
        self.site = work / "site"
        self.parts: dict[str, dict] = {}
        self.env = dict(os.environ)
        self.env["PYTHONUNBUFFERED"] = "1"
        if dry_run:
            self.env["CUDA_VISIBLE_DEVICES"] = ""  # CPU even on a GPU machine: the stand-ins apply
            self.env["OMP_NUM_THREADS"] = "1"
        self.env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(self.site), str(ROOT), os.environ.get("PYTHONPATH", "")) if p)

    def budget(self, part: str) -> float:
        return max(1.0, min(BUDGET_S[part], self.deadline - time.monotonic()))

    def run(self, part: str, name: str, cmd: list[str], env: dict | None = None,
            timeout: float | None = None) -> tuple[int, str]:
        """Run a worker with its output in <work>/<name>.log; (exit status or 124, log tail)."""
        log = self.work / f"{name}.log"
        with open(log, "w") as f:
            try:
                rc = subprocess.run(cmd, cwd=ROOT, env=env or self.env, stdout=f,
                                    stderr=subprocess.STDOUT,
                                    timeout=timeout or self.budget(part)).returncode
            except subprocess.TimeoutExpired:
                rc = 124
        return rc, tail(log)

    def record(self, part: str, result: dict, t0: float) -> None:
        result["wall_s"] = round(time.monotonic() - t0, 2)
        self.parts[part] = result
        line = {k: v for k, v in result.items() if not isinstance(v, (dict, list))}
        print(f"[{part}] {json.dumps(line)}", flush=True)


def tail(path: Path, n: int = 25) -> str:
    lines = [x for x in path.read_text(errors="replace").splitlines()
             if "warn" not in x.lower() and x.strip()]
    return "\n".join(lines[-n:])


def wheel_tags_ok(wheel: Path) -> str | None:
    """None if this interpreter can install the wheel, else why not."""
    from packaging.tags import sys_tags
    from packaging.utils import parse_wheel_filename

    try:
        _, _, _, tags = parse_wheel_filename(wheel.name)
    except Exception as e:
        return f"not a wheel name ({e})"
    if tags & set(sys_tags()):
        return None
    return f"built for {sorted(str(t) for t in tags)[0]}, not this CPython {platform.python_version()}"


# ---------------------------------------------------------------- parts
def part_wheels(s: Suite) -> None:
    t0 = time.monotonic()
    wheels = sorted(s.wheels.glob("*.whl"))
    usable = [w for w in wheels if wheel_tags_ok(w) is None]
    result: dict = {"wheels": [w.name for w in wheels], "site": str(s.site),
                    "not_installed": {w.name: wheel_tags_ok(w) for w in wheels if w not in usable}}
    if not wheels:
        result.update(status="skipped", reason=f"no {s.wheels.name}/ wheels here (bench/gpu_wheels.sh "
                                               "fetches them); using what is installed")
    elif usable:
        rc, out = s.run("wheels", "wheels", [
            sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
            "--no-cache-dir", "--upgrade", "--target", str(s.site), *map(str, usable)])
        result.update(status="ok" if rc == 0 else "failed", installed=[w.name for w in usable])
        if rc:
            result["error"] = out
    else:
        result.update(status="skipped", reason="no wheel fits this interpreter (dry run on "
                                               f"CPython {platform.python_version()}?)")
    # what the workers will import, from where
    probe = ("import json, megatron.core as m, zmq, torch; print(json.dumps({'megatron_core': "
             "m.__version__, 'megatron_core_from': m.__file__, 'pyzmq': zmq.__version__, "
             "'torch': torch.__version__, 'cuda': torch.version.cuda}))")
    proc = subprocess.run([sys.executable, "-c", probe], env=s.env, capture_output=True, text=True,
                          timeout=60)
    if proc.returncode == 0:
        result["versions"] = json.loads(proc.stdout.strip().splitlines()[-1])
        result["from_site"] = result["versions"]["megatron_core_from"].startswith(str(s.site))
    else:
        result.update(status="failed", error=proc.stderr.strip().splitlines()[-1:])
    s.record("wheels", result, t0)


def part_learner(s: Suite, name: str, modes: str, steps: int, warmup: int) -> dict:
    t0 = time.monotonic()
    out = s.work / f"{name}.json"
    cmd = [sys.executable, str(BENCH / "_gpu_learner.py"), "--out", str(out), "--modes", modes,
           "--steps", str(steps), "--warmup", str(warmup)] + (["--dry-run"] if s.dry_run else [])
    rc, log = s.run(name, name, cmd)
    first = json.loads(out.read_text()) if out.exists() else None
    if first and not s.dry_run and any(m.get("out_of_memory") for m in first["modes"].values()) \
            and first["layers"] > 1:
        # plan's estimate was short of the truth: half the layers, once (and say so)
        print(f"[{name}] out of memory with {first['layers']} layers; again with "
              f"{first['layers'] // 2}", flush=True)
        out.unlink()
        rc, log = s.run(name, name + "_retry", cmd + ["--max-layers", str(first["layers"] // 2)])
    if out.exists():
        result = json.loads(out.read_text())
        if first is not None and result is not first and first["layers"] != result["layers"]:
            result["out_of_memory_at_layers"] = first["layers"]
        result["status"] = "ok" if any(m["status"] == "ok" for m in result["modes"].values()) \
            else "skipped" if all(m["status"] == "skipped" for m in result["modes"].values()) \
            else "failed"
        if result["status"] == "skipped":
            result["reason"] = "; ".join(f"{m}: {r['reason']}" for m, r in result["modes"].items())
        if rc:
            result.update(exit=rc, log_tail=log)
    else:
        result = {"status": "failed",
                  "error": f"timed out after {s.budget(name):.0f} s" if rc == 124 else f"exit {rc}",
                  "log_tail": log}
    s.record(name, result, t0)
    return result


def part_nccl(s: Suite, layers: int) -> None:
    t0 = time.monotonic()
    out = s.work / "nccl.json"
    env_r, env_s = dict(s.env), dict(s.env)
    if not s.dry_run:  # two hosts to NCCL (see the module docstring); sockets, never InfiniBand
        env_r["NCCL_HOSTID"], env_s["NCCL_HOSTID"] = "gpu-suite-receiver", "gpu-suite-sender"
        env_r["NCCL_IB_DISABLE"] = env_s["NCCL_IB_DISABLE"] = "1"
        for env in (env_r, env_s):  # the logs say which transport NCCL chose, or why it failed
            env.update(NCCL_DEBUG="INFO", NCCL_DEBUG_SUBSYS="INIT,NET")
    rlog = open(s.work / "receiver.log", "w")
    receiver = subprocess.Popen(
        [sys.executable, str(BENCH / "_gpu_receiver.py"), "--device", "cpu" if s.dry_run else "cuda"],
        cwd=ROOT, env=env_r, stdout=rlog, stderr=subprocess.STDOUT)
    try:
        port = None
        while port is None and time.monotonic() < t0 + 60 and receiver.poll() is None:
            for line in (s.work / "receiver.log").read_text().splitlines():
                if line.startswith("PORT "):
                    port = int(line.split()[1])
            time.sleep(0.05)
        if port is None:
            result = {"status": "failed", "error": "the receiver did not start",
                      "log_tail": tail(s.work / "receiver.log")}
        else:
            cmd = [sys.executable, str(BENCH / "_gpu_publish.py"), "--url", f"http://127.0.0.1:{port}",
                   "--out", str(out), "--layers", str(layers),
                   "--timeout-s", str(60 if s.dry_run else 100)] + (["--dry-run"] if s.dry_run else [])
            rc, log = s.run("nccl", "publish", cmd, env=env_s)
            if rc == 0 and out.exists():
                result = json.loads(out.read_text())
                result.pop("names")  # hundreds on the GPU; the count stays
                result["status"] = "ok" if result["checksums_match"] and \
                    result["received_equal_sent_exact"] is not False else "failed"
                if not s.dry_run:
                    result["transport"] = ("NCCL socket transport on loopback (one NCCL_HOSTID per "
                                           "process: NCCL refuses two ranks on one GPU)")
            else:
                result = {"status": "failed",
                          "error": f"timed out after {s.budget('nccl'):.0f} s" if rc == 124
                          else f"exit {rc}", "log_tail": log,
                          "receiver_log_tail": tail(s.work / "receiver.log")}
    finally:
        receiver.kill()
        receiver.wait()
        rlog.close()
    s.record("nccl", result, t0)


def part_fp8(s: Suite) -> None:
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", "import transformer_engine.pytorch"], env=s.env,
                          capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        err = (proc.stderr.strip().splitlines() or ["(no message)"])[-1]
        s.record("fp8", {"status": "skipped",
                         "reason": f"import transformer_engine failed: {err}"}, t0)
        return
    part_learner(s, "fp8", FP8_MODES, steps=3, warmup=1)


def part_gpu_tests(s: Suite) -> None:
    import xml.etree.ElementTree as ET

    t0 = time.monotonic()
    xml = s.work / "gpu_tests.xml"
    rc, log = s.run("gpu_tests", "gpu_tests", [
        sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={xml}",
        str(ROOT / "tests" / "test_gpu_metrics.py")])
    result: dict = {"tests": "tests/test_gpu_metrics.py"}
    if xml.exists():
        suite = ET.parse(xml).getroot()
        suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
        counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
        result.update(passed=counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"],
                      failed=counts["failures"] + counts["errors"], skipped=counts["skipped"],
                      skipped_tests=[c.get("name") for c in suite.iter("testcase")
                                     if c.find("skipped") is not None])
    result["status"] = "ok" if rc == 0 else "failed"
    if rc:
        result["log_tail"] = log
    s.record("gpu_tests", result, t0)


# ---------------------------------------------------------------- summary
def figures(parts: dict) -> dict:
    """The numbers docs/benchmarks.md records, flat."""
    f = {}
    lr = parts.get("learner", {})
    bf = lr.get("modes", {}).get("bfloat16", {})
    if bf.get("status") == "ok":
        f.update({"learner.layers": lr["layers"], "learner.tokens_per_step": lr["tokens_per_step"],
                  "learner.step_s": bf["step_s_median"], "learner.tokens_per_s": bf["tokens_per_s"],
                  "learner.tflops": bf["achieved_tflops"], "learner.mfu": bf["mfu"],
                  "learner.peak_tflops": bf["peak_tflops"], "learner.matmul_tflops": bf["matmul_tflops"],
                  "learner.learner_over_matmul": bf["learner_over_matmul"],
                  "learner.peak_mem_gib": bf["peak_gpu_mem_gib"],
                  "learner.plan_estimate_gib": lr["plan_estimate_gib"]})
    nc = parts.get("nccl", {})
    if nc.get("status") == "ok":
        f.update({"nccl.bytes": nc["bytes"], "nccl.publish_s": nc["publish_s_median"],
                  "nccl.raw_s": nc["raw_s_median"], "nccl.publish_over_raw": nc["publish_over_raw"],
                  "nccl.raw_gb_per_s": nc["raw_gb_per_s"], "nccl.produce_s": nc["produce_s_median"]})
    for mode, r in parts.get("fp8", {}).get("modes", {}).items():
        if r.get("status") == "ok":
            f[f"fp8.{mode}.tokens_per_s"] = r["tokens_per_s"]
            f[f"fp8.{mode}.mfu"] = r["mfu"]
    f.update({f"fp8.{k}": v for k, v in parts.get("fp8", {}).get("ratios", {}).items()})
    return f


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="CPU-sized shapes, gloo, CPU stand-ins")
    ap.add_argument("--work", default=None, help="work directory (default: a temporary one)")
    ap.add_argument("--parts", default="wheels,learner,nccl,fp8,gpu_tests")
    ap.add_argument("--total-s", type=float, default=TOTAL_S)
    ap.add_argument("--wheels", default=str(WHEELS), help="folder of wheels to install (.whl)")
    args = ap.parse_args()
    t0 = time.monotonic()
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="gpu_suite_"))
    work.mkdir(parents=True, exist_ok=True)
    s = Suite(args.dry_run, work, args.total_s, Path(args.wheels))
    wanted = args.parts.split(",")
    print(f"gpu_suite: {'dry run (CPU)' if args.dry_run else 'GPU'}; python {platform.python_version()};"
          f" work {work}", flush=True)
    if shutil.which("nvidia-smi") and not args.dry_run:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version",
                              "--format=csv,noheader"], capture_output=True, text=True)
        print(f"nvidia-smi: {smi.stdout.strip()}", flush=True)
    if "wheels" in wanted:
        part_wheels(s)
    learner = part_learner(s, "learner", "bfloat16", steps=4, warmup=2) \
        if "learner" in wanted else {}
    if "nccl" in wanted:
        part_nccl(s, layers=2)
    if "fp8" in wanted:
        part_fp8(s)
    if "gpu_tests" in wanted:
        part_gpu_tests(s)
    skipped = {p: r.get("reason", "") for p, r in s.parts.items() if r["status"] == "skipped"}
    for mode, r in learner.get("modes", {}).items():
        if r["status"] == "skipped":
            skipped[f"learner.{mode}"] = r["reason"]
    failed = sorted(p for p, r in s.parts.items() if r["status"] == "failed")
    device = learner.get("device") or s.parts.get("nccl", {}).get("device") or "unknown"
    print(f"gpu_suite: ok {sorted(p for p, r in s.parts.items() if r['status'] == 'ok')}, "
          f"skipped {sorted(skipped)}, failed {failed}; wall {time.monotonic() - t0:.0f} s", flush=True)
    print(json.dumps({"bench": "gpu_suite", "dry_run": args.dry_run, "device": device,
                      "python": platform.python_version(), "figures": figures(s.parts),
                      "skipped": skipped, "failed": failed, "parts": s.parts,
                      "wall_s": round(time.monotonic() - t0, 1)}), flush=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
