"""`run(cfg, site)`: the one launch path of every launcher. Start a run's processes where the
site says, wire and supervise them, summarise the run.

Starts the teacher and rollout SGLang servers (fleet.py's specs, placed by the site), then the
learner and the orchestrator, wires them (HTTP to SGLang, ZeroMQ to the learner) through
`wiring.json` in the run directory, and shuts every process group down on success, on Ctrl-C /
SIGTERM, and as soon as the learner or the orchestrator dies (ProcessDied names the process and
shows the tail of its log). A dead SGLang server is restarted on its port, at most
`server.max_restarts` times each (restarts are counted in `server_restarts.json` in the run
directory; see docs/fault-tolerance.md). A fleet of several servers gets an smg router
(`server.router=smg`, docs/fleets.md): a down server is drained from it and rejoins when ready
with the current weights; per-server figures go to `fleet_stats.json` every few seconds.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from megatron_opd.config import Config
from megatron_opd.errors import ProcessDied, Terminated
from megatron_opd.launch.fleet import FLEETS
from megatron_opd.launch.rundir import RunFinished, prepare_run_dir, run_secret
from megatron_opd.launch.sites import Site, place_fleets
from megatron_opd.logs import event
from megatron_opd.metrics import plot_curves, read_metrics
from megatron_opd.listeners import port_for_later
from megatron_opd.procs import log_tail, spawn_group, stop_group
from megatron_opd.wiring import RunWiring


RESTARTS_FILE = "server_restarts.json"  # {server name: restarts}, written by the supervisor
FLEET_STATS_FILE = "fleet_stats.json"  # flat per-server figures, rewritten every STATS_EVERY_S
STATS_EVERY_S = 3.0


@dataclass
class Child:
    name: str
    proc: subprocess.Popen
    log: Path

    @classmethod
    def spawn(cls, name: str, args: list[str], log: Path, env: dict | None = None) -> "Child":
        return cls(name, spawn_group(args, log, {**os.environ, **(env or {})}), log)

    def stop(self, timeout: float = 15.0) -> None:
        stop_group(self.proc, timeout)


def run(cfg: Config, site: Site, *, preempt_signal: int | None = None) -> dict:
    """Start the run's processes where `site` says, supervise them, summarise the run.

    With `preempt_signal` (the Slurm driver's warning signal), that signal asks the learner to
    checkpoint and exit at its next step; the summary then says `preempted` and the caller
    requeues. SIGTERM and Ctrl-C stop everything at once (what was accepted is in the spool)."""
    from megatron_opd.envs import prepare_models
    from megatron_opd.learner import preemption

    try:
        run_dir = prepare_run_dir(cfg)
    except RunFinished as e:  # nothing to do, and nothing touched: its summary, exit 0
        print(f"[megatron-opd] {e}", flush=True)
        return e.summary
    preemption.clear(run_dir)
    if preempt_signal is not None:  # from now on: a warning during `prepare` is not lost
        def _ask_learner_to_checkpoint(signum, frame):
            (run_dir / preemption.REQUEST_FILE).write_text(f"signal {signum}\n")
            print(f"[megatron-opd] signal {signum}: the learner checkpoints at its next step, "
                  "then the run stops", flush=True)

        previous_preempt = signal.signal(preempt_signal, _ask_learner_to_checkpoint)
    models = prepare_models(cfg, progress=cfg.logging.progress)
    from megatron_opd.learner.main import masked_token_ids

    masked_token_ids(cfg.objective.masked_tokens, models.student_dir)  # a bad token fails here
    logs = run_dir / "logs"
    # In offline mode (teacher.mode=offline) the teacher server scores nothing for training: it
    # serves evaluation only (the exact reverse KL against the teacher); the rollout server
    # serves the store's build (version 0, before the learner starts) and evaluation.
    specs, fleets = place_fleets(cfg, models, logs, site)
    servers = [s for role in FLEETS for s in fleets[role]]
    children: list[Child] = []
    routers: dict = {}  # {role: SmgRouter} for the fleets behind one
    previous_term = signal.signal(signal.SIGTERM, _raise_terminated)
    # Ctrl-C must stop the run even when we were started with SIGINT ignored (background jobs
    # of non-interactive shells inherit SIG_IGN, and Python then installs no handler).
    previous_int = signal.signal(signal.SIGINT, signal.default_int_handler)
    t_start = time.time()
    event("launcher", "start", run_dir=run_dir, steps=cfg.train.steps,
          resume_from_step=_checkpoint_step(run_dir) if cfg.train.resume else 0)
    try:
        from megatron_opd.serving.sglang_server import start_servers

        print(f"[megatron-opd] starting SGLang servers (logs in {logs})", flush=True)
        start_servers(servers, cfg.server.start_timeout_s)
        rollout_urls = [s.url for s in fleets["rollout"]]
        teacher_urls = [s.url for s in fleets["teacher"]]
        event("launcher", "servers ready", teacher=",".join(teacher_urls),
              rollout=",".join(rollout_urls))
        groups = _router_groups(specs, fleets)
        _start_routers(cfg, groups, logs, site.address, routers)
        offline_store = ""
        if cfg.teacher.mode == "offline":  # made here if missing, with the fresh servers
            from megatron_opd.offline_build import build_store

            offline_store = str(build_store(cfg, rollout_urls[0], teacher_urls[0],
                                            str(models.student_dir),
                                            progress=cfg.logging.progress).path)
        addr = site.address
        wiring = RunWiring(
            run_dir=str(run_dir), rollout_urls=rollout_urls, teacher_urls=teacher_urls,
            samples_endpoint=f"tcp://{addr}:{port_for_later(addr)}",
            control_endpoint=f"tcp://{addr}:{port_for_later(addr)}",
            teacher_dir=str(models.teacher_dir), student_dir=str(models.student_dir),
            weight_sync_master_addr=addr, weight_sync_master_port=port_for_later(addr),
            rollout_server_world_size=specs["rollout"][0].world_size,
            offline_store=offline_store, secret_file=run_secret(cfg, run_dir),
            rollout_router_url=routers["rollout"].url if "rollout" in routers else "",
            teacher_router_url=routers["teacher"].url if "teacher" in routers else "",
            teacher_fleets={k[len("teacher-"):]: [s.url for s in v] for k, v in groups.items()
                            if k.startswith("teacher-")},
            teacher_fleet_routers={k[len("teacher-"):]: r.url for k, r in routers.items()
                                   if k.startswith("teacher-")})
        wiring.save(run_dir / "wiring.json")
        py = [sys.executable, "-m"]
        children.append(Child.spawn("learner", site.learner_command(cfg, run_dir),
                                    logs / "learner.log", {"OMP_NUM_THREADS": "1"}))
        children.append(Child.spawn("orchestrator", py + ["megatron_opd.orchestrator", "--run-dir",
                                                          str(run_dir)], logs / "orchestrator.log",
                                    {"OMP_NUM_THREADS": "1"}))
        t_train = time.time()
        _supervise(cfg, run_dir, fleets, children, routers, groups)
        train_seconds = time.time() - t_train
    except ProcessDied as e:  # end the message with the command that continues the run
        raise ProcessDied(f"{e}\n{_rerun_hint(cfg, run_dir, site)}") from None
    finally:
        # A second Ctrl-C (or SIGTERM) must not cut the shutdown short: a process group not
        # stopped yet would be orphaned.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        for c in reversed(children):
            c.stop()
        for r in routers.values():
            r.stop()
        for s in servers:
            s.stop()
        signal.signal(signal.SIGTERM, previous_term)
        signal.signal(signal.SIGINT, previous_int)
        if preempt_signal is not None:
            signal.signal(preempt_signal, previous_preempt)
    records = read_metrics(run_dir / "metrics.jsonl")
    plot_curves(run_dir / "metrics.jsonl", run_dir / "curves.png")
    preempted = preemption.was_preempted(run_dir)
    if preempted is not None:  # stopped early with a checkpoint: no final evaluation
        event("launcher", "preempted", step=preempted.get("step"))
        return {"preempted": preempted, "train_seconds": train_seconds,
                "total_seconds": time.time() - t_start}
    summary = _summary(records, train_seconds, time.time() - t_start, models.meta)
    if (run_dir / RESTARTS_FILE).exists():
        summary["server_restarts"] = json.loads((run_dir / RESTARTS_FILE).read_text())
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    event("launcher", "finished", steps=summary["steps"], seconds=f"{time.time() - t_start:.0f}")
    return summary


def _rerun_hint(cfg: Config, run_dir: Path, site: Site) -> str:
    """The command that continues a failed run: resume from its newest checkpoint, or (none
    yet, or `train.resume=false`) start it again."""
    command = site.rerun_command(run_dir)
    step = _checkpoint_step(run_dir)
    if step and cfg.train.resume:
        return f"resume it from its checkpoint at step {step} with: {command} run.overwrite=false"
    return f"no checkpoint to resume from; start it again with: {command} run.overwrite=true"


def _raise_terminated(signum, frame):
    raise Terminated(f"signal {signum}")


def _router_groups(specs: dict, fleets: dict) -> dict[str, list]:
    """The server groups a router fronts: {"rollout", "teacher"} or, with several teachers
    (teacher.teachers), one group per teacher, "teacher-<name>"."""
    groups = {"rollout": list(fleets["rollout"])}
    for spec, server in zip(specs["teacher"], fleets["teacher"]):
        groups.setdefault(f"teacher-{spec.teacher}" if spec.teacher else "teacher",
                          []).append(server)
    return groups


def _start_routers(cfg: Config, fleets: dict, logs: Path, address: str, routers: dict) -> None:
    """An smg router for each fleet of more than one server (`server.router=smg`), bound to the
    site's address, listing every server of the fleet before any traffic: into `routers`
    ({group: SmgRouter}, groups of `_router_groups`; the caller stops them, also when one failed
    to start)."""
    from megatron_opd.serving.router import SmgRouter

    if cfg.server.router != "smg":
        return
    for role in fleets:
        if len(fleets[role]) > 1:
            r = SmgRouter(f"{role}-router", [s.url for s in fleets[role]],
                          cfg.server.router_policy, port_for_later(address),
                          str(logs / f"{role}-router.log"), host=address)
            routers[role] = r
            r.start()
    for role, r in routers.items():
        r.wait_ready(cfg.server.start_timeout_s)
        event("launcher", "router ready", fleet=role, url=r.url,
              policy=cfg.server.router_policy, workers=len(r.worker_urls))


def _supervise(cfg: Config, run_dir: Path, fleets: dict, children: list[Child],
               routers: dict | None = None, groups: dict | None = None) -> None:
    """Wait for the learner to finish; fail fast, naming the process, if the learner or the
    orchestrator dies; restart a dead SGLang server (bounded: server.max_restarts each), or one
    whose health probe fails for server.health_timeout_s; drain and rejoin servers behind a
    router; restart a dead router; write the fleet's figures to fleet_stats.json."""
    from tqdm import tqdm

    from megatron_opd.serving.sglang_server import (FleetProbe, ServerRestartLimit,
                                                    ServerSupervisor, write_json_atomic)

    routers, groups = routers or {}, groups or fleets
    servers = [s for role in FLEETS for s in fleets[role]]
    roles = {s.name: group for group in groups for s in groups[group]}  # a server's router
    probe = FleetProbe(servers, versioned={s.name for s in fleets["rollout"]}).start()
    supervisor = ServerSupervisor(
        servers, cfg.server.max_restarts, run_dir / RESTARTS_FILE, probe=probe,
        health_timeout_s=cfg.server.health_timeout_s,
        routers=routers, roles=roles)
    router_restarts = {r.name: 0 for r in routers.values()}
    stats_at = 0.0

    learner = children[0]
    metrics_path = run_dir / "metrics.jsonl"
    # A resumed run: the bar starts at the checkpoint's step, so its rate counts only the steps
    # of this launch; until the learner has cut the killed run's records after the checkpoint
    # (MetricsWriter replaces the file) or written to it, the file is not read.
    done = _checkpoint_step(run_dir) if cfg.train.resume else 0
    stale = _identity(metrics_path) if done else None
    bar = tqdm(total=cfg.train.steps, initial=done, desc="train", unit="step",
               disable=not cfg.logging.progress)
    try:
        while True:
            code = learner.proc.poll()
            if code == 0:
                break
            if code is not None:
                raise ProcessDied(f"learner exited with code {code}; last lines of {learner.log}:\n"
                                  + log_tail(learner.log))
            for c in children[1:]:
                if c.proc.poll() not in (None, 0):  # 0: it finished (e.g. after Shutdown)
                    raise ProcessDied(f"{c.name} exited with code {c.proc.returncode}; last lines "
                                      f"of {c.log}:\n" + log_tail(c.log))
            try:  # a dead server is restarted on its port (clients retry, the publisher reconnects)
                supervisor.check()
            except ServerRestartLimit as e:
                raise ProcessDied(str(e)) from None
            for role, r in routers.items():
                if not r.alive():
                    _restart_router(cfg, r, router_restarts, supervisor, groups[role])
            if time.time() - stats_at >= STATS_EVERY_S:
                stats_at = time.time()
                stats = supervisor.stats()
                for name, n in router_restarts.items():
                    stats[f"fleet/{name}/restarts"] = n
                    stats[f"fleet/{name}/up"] = int(any(r.alive() for r in routers.values()
                                                        if r.name == name))
                write_json_atomic(run_dir / FLEET_STATS_FILE, {"time": stats_at, **stats})
            _update_bar(bar, metrics_path, stale)
            time.sleep(0.5)
        _update_bar(bar, metrics_path, stale)
    finally:
        probe.close()
        bar.close()


def _restart_router(cfg: Config, router, restarts: dict, supervisor, servers) -> None:
    """A dead router comes back on its port listing the fleet's servers that are not drained
    (bounded by server.max_restarts, like a server)."""
    n = restarts[router.name]
    if n >= cfg.server.max_restarts:
        raise ProcessDied(f"router {router.name} exited with code {router.proc.returncode} and "
                          f"was already restarted {n} times (server.max_restarts="
                          f"{cfg.server.max_restarts}); last lines of {router.log_path}:\n"
                          + log_tail(router.log_path))
    router.stop(timeout=5.0)
    restarts[router.name] = n + 1
    urls = [s.url for s in servers if s.name not in supervisor.drained]
    print(f"[megatron-opd] router {router.name} exited with code {router.proc.returncode}; "
          f"restarted ({n + 1}/{cfg.server.max_restarts})", file=sys.stderr, flush=True)
    router.start(urls)
    router.wait_ready(cfg.server.start_timeout_s, expect=urls)


def _checkpoint_step(run_dir: Path) -> int:
    """Steps done by the checkpoint a resumed run starts from (`checkpoints/latest`); 0 if none."""
    try:
        return int((run_dir / "checkpoints" / "latest").read_text().strip().rsplit("_", 1)[1])
    except (FileNotFoundError, IndexError, ValueError):
        return 0


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_size


def _update_bar(bar, metrics_path: Path, stale: tuple[int, int] | None = None) -> None:
    """Steps done and the latest figures. Evaluation figures are labelled with the version they
    evaluated (`eval_kl@v350`): they are as old as the last evaluation, unlike the loss.
    `stale`: (inode, size) of a killed run's file, not read until the learner changed it."""
    if not metrics_path.exists() or (stale is not None and _identity(metrics_path) == stale):
        return
    records = [r for r in read_metrics(metrics_path) if "train/loss" in r]
    if len(records) < bar.n:  # resumed from an older checkpoint than `latest` (fallback)
        bar.n = bar.initial = bar.last_print_n = len(records)
        bar.refresh()
    if len(records) > bar.n:
        last = records[-1]
        bar.update(len(records) - bar.n)
        shown = {"loss": f"{last['train/loss']:.3f}", "v": last["weights/version"]}
        at = f"@v{last.get('eval/version', '?')}"
        if last.get("eval/reverse_kl") is not None:
            shown[f"eval_kl{at}"] = f"{last['eval/reverse_kl']:.3f}"
        if last.get("eval/accuracy") is not None:
            shown[f"eval_acc{at}"] = f"{last['eval/accuracy']:.2f}"
        bar.set_postfix(shown)  # in this order (keyword arguments would be sorted)


def _summary(records: list[dict], train_seconds: float, total_seconds: float, prepared: dict) -> dict:
    # the earliest evaluation logged (version 0, unless eval.interval=1 overwrote its record)
    first = min((r for r in records if r.get("eval/version") is not None),
                key=lambda r: r["eval/version"])
    last = records[-1]
    kl0, kl1 = first["eval/reverse_kl"], last["eval/reverse_kl"]
    return {
        "steps": max(r["step"] for r in records if "train/loss" in r) + 1,
        "final_version": last["weights/version"],
        "eval/reverse_kl": {"initial": kl0, "final": kl1, "relative_drop": 1 - kl1 / kl0},
        **({"eval/accuracy": {"initial": first["eval/accuracy"], "final": last["eval/accuracy"]}}
           if "eval/accuracy" in last else {}),
        "teacher_accuracy": prepared.get("teacher", {}).get("eval_accuracy"),
        "train_seconds": train_seconds,
        "total_seconds": total_seconds,
    }
