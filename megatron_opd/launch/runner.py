"""`megatron-opd train`: run every process of an OPD run on this machine and supervise them.

Starts the teacher and rollout SGLang servers, then the learner and the orchestrator, wires them
(HTTP to SGLang, ZeroMQ to the learner) through `wiring.json` in the run directory, and shuts
every process group down on success, on Ctrl-C / SIGTERM, and as soon as the learner or the
orchestrator dies (the error names the process and shows the tail of its log). A dead SGLang
server is restarted on its port, at most `server.max_restarts` times each (restarts are counted
in `server_restarts.json` in the run directory; see docs/fault-tolerance.md).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from megatron_opd.config import Config, ConfigError, dump_config
from megatron_opd.metrics import plot_curves, read_metrics
from megatron_opd.procs import free_port as _free_port, log_tail, spawn_group, stop_group
from megatron_opd.wiring import RunWiring


RESTARTS_FILE = "server_restarts.json"  # {server name: restarts}, written by the supervisor


class ProcessDied(RuntimeError):
    pass


class Terminated(Exception):
    """SIGTERM (e.g. scancel / preemption) turned into an exception so cleanup runs."""


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


# Keys that may change when a run is resumed (everything else must match the saved config).
RESUMABLE_CHANGES = ("train.steps", "run.overwrite", "logging.progress", "logging.tensorboard",
                     "server.start_timeout_s", "server.request_timeout_s")


def prepare_run_dir(cfg: Config) -> Path:
    """A fresh run directory; or, when it holds a checkpoint and `train.resume` is on, the same
    directory to continue (the learner resumes from `checkpoints/latest`, drops metrics logged
    after it, and replays the accepted samples of its spool). `run.overwrite=true` wipes it."""
    run_dir = Path(cfg.run.dir).resolve()
    resumable = (run_dir / "checkpoints" / "latest").is_file() and cfg.train.resume
    if cfg.run.overwrite:
        for name in ("metrics.jsonl", "curves.png", "summary.json", "wiring.json"):
            (run_dir / name).unlink(missing_ok=True)
        for name in ("checkpoints", "spool", "tensorboard"):
            shutil.rmtree(run_dir / name, ignore_errors=True)
    elif resumable:
        _check_resumable(cfg, run_dir)
    elif (run_dir / "metrics.jsonl").exists():
        raise FileExistsError(f"run.dir: {run_dir} already holds a run without a checkpoint to "
                              "resume from (set run.overwrite=true to replace it)")
    (run_dir / "logs").mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(dump_config(cfg))
    return run_dir


def _check_resumable(cfg: Config, run_dir: Path) -> None:
    """Refuse to continue a run under a different config (naming the keys that differ)."""
    import yaml

    from megatron_opd.config import to_dict

    saved_path = run_dir / "config.yaml"
    if not saved_path.is_file():
        raise ConfigError(f"run.dir: {run_dir} has a checkpoint but no config.yaml to resume with")
    saved, now = _flatten(yaml.safe_load(saved_path.read_text()) or {}), _flatten(to_dict(cfg))
    # Keys only one side has come from another megatron-opd version (a key added since, with its
    # default, or one removed): not a change of this run.
    differ = sorted(k for k in set(saved) & set(now)
                    if saved[k] != now[k] and k not in RESUMABLE_CHANGES)
    if differ:
        shown = ", ".join(f"{k} ({saved.get(k)!r} -> {now.get(k)!r})" for k in differ[:5])
        raise ConfigError(f"{differ[0]}: run.dir {run_dir} holds a checkpoint made with another "
                          f"config; differing: {shown}. Resume with the same config (only "
                          f"{', '.join(RESUMABLE_CHANGES)} may change), or set "
                          "run.overwrite=true to start over")


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, dict):
            out.update(_flatten(v, key))
        else:
            out[key] = v
    return out


class LocalSite:
    """Where the embedded launcher puts a run's processes: all on this machine, on loopback.
    (The Slurm job driver has its own site: megatron_opd/slurm/job.py.)"""

    address = "127.0.0.1"  # the learner's sockets and the weight-sync rendezvous bind here
    rollout_server_world_size = 1  # GPUs (ranks) per rollout server

    def servers(self, cfg: Config, models, logs: Path) -> dict:
        return make_servers(cfg, models, logs)

    def learner_command(self, cfg: Config, run_dir: Path) -> list[str]:
        return _learner_command(cfg, run_dir)


def check_startable(cfg: Config, *, here: bool = True) -> None:
    """What a run needs on disk, refused before any process starts: the checkpoints named by
    `init.*` (config.json, weights, the student's tokenizer), one vocabulary for student and
    teacher, and the prompt files. `here=False` (`submit --dry-run` away from the cluster)
    skips what only the cluster's filesystem holds."""
    if not here:
        return
    for key in ("student", "teacher"):
        path = getattr(cfg.init, key)
        if not path:
            continue
        d = Path(path)
        if not (d / "config.json").is_file():
            raise ConfigError(f"init.{key}: {d} is not a Hugging Face model directory (no "
                              "config.json); point it at one (tools/convert_checkpoint.py "
                              "megatron-to-hf makes one from a learner checkpoint)")
        if not any(d.glob("*.safetensors")):
            raise ConfigError(f"init.{key}: {d} has no *.safetensors weights")
    if cfg.env.name == "chat":
        _check_prompt_files(cfg)
    if cfg.init.student:
        from megatron_opd.data.tokenizers import TokenizerMismatch, compare_vocabularies

        try:  # token ids cross between the two models: one vocabulary, or nothing starts
            compare_vocabularies(cfg.init.student, cfg.init.teacher)
        except TokenizerMismatch as e:
            raise ConfigError(f"init.teacher: {e}") from None


def _check_prompt_files(cfg: Config) -> None:
    """Every row of the prompt files parses (a malformed one is named by file and line, or
    skipped and counted with `data.bad_rows=skip`) before any server starts."""
    from megatron_opd.data.prompts import PromptDataError, read_prompt_rows

    d = cfg.data
    for key in ("train", "eval"):
        path = getattr(d, key)
        if not path:
            continue
        if not Path(path).exists():
            raise ConfigError(f"data.{key}: {path} does not exist")
        try:
            rows = read_prompt_rows(path, prompt_key=d.prompt_key, label_key=d.label_key,
                                    on_error="skip" if d.bad_rows == "skip" else "raise")
        except PromptDataError as e:
            raise ConfigError(f"data.{key}: {e} (or set data.bad_rows=skip to skip and count "
                              "malformed rows)") from None
        if not rows.rows:
            raise ConfigError(f"data.{key}: {path} holds no usable prompt")
        skipped = f", {rows.skipped} malformed skipped" if rows.skipped else ""
        print(f"[megatron-opd] data.{key}: {len(rows.rows)} prompts in {path}{skipped}",
              flush=True)


def train(cfg: Config) -> dict:
    """The embedded launcher: every process of the run on this machine."""
    from megatron_opd.models.precision import resolve_here

    check_startable(cfg)
    # The learner runs here: refuse a precision this machine cannot run before anything starts.
    resolve_here(cfg.precision, distributed_optimizer=cfg.train.distributed_optimizer)
    return run(cfg, LocalSite())


def run(cfg: Config, site, *, preempt_signal: int | None = None) -> dict:
    """Start the run's processes where `site` says, supervise them, summarise the run.

    With `preempt_signal` (the Slurm driver's warning signal), that signal asks the learner to
    checkpoint and exit at its next step; the summary then says `preempted` and the caller
    requeues. SIGTERM and Ctrl-C stop everything at once (what was accepted is in the spool)."""
    from megatron_opd.envs import prepare_models
    from megatron_opd.learner import preemption

    run_dir = prepare_run_dir(cfg)
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
    fleets = site.servers(cfg, models, logs)
    servers = [s for fleet in ("teacher", "rollout") for s in fleets[fleet]]
    children: list[Child] = []
    previous_term = signal.signal(signal.SIGTERM, _raise_terminated)
    # Ctrl-C must stop the run even when we were started with SIGINT ignored (background jobs
    # of non-interactive shells inherit SIG_IGN, and Python then installs no handler).
    previous_int = signal.signal(signal.SIGINT, signal.default_int_handler)
    t_start = time.time()
    try:
        for s in servers:
            s.start()
        print(f"[megatron-opd] starting SGLang servers (logs in {logs})", flush=True)
        for s in servers:
            s.wait_ready(timeout=cfg.server.start_timeout_s)
        rollout_urls = [s.url for s in fleets["rollout"]]
        teacher_urls = [s.url for s in fleets["teacher"]]
        offline_store = ""
        if cfg.teacher.mode == "offline":  # made here if missing, with the fresh servers
            from megatron_opd.offline_build import build_store

            offline_store = str(build_store(cfg, rollout_urls[0], teacher_urls[0],
                                            str(models.student_dir),
                                            progress=cfg.logging.progress).path)
        addr = site.address
        wiring = RunWiring(
            run_dir=str(run_dir), rollout_urls=rollout_urls, teacher_urls=teacher_urls,
            samples_endpoint=f"tcp://{addr}:{_free_port(addr)}",
            control_endpoint=f"tcp://{addr}:{_free_port(addr)}",
            teacher_dir=str(models.teacher_dir), student_dir=str(models.student_dir),
            weight_sync_master_addr=addr, weight_sync_master_port=_free_port(addr),
            rollout_server_world_size=site.rollout_server_world_size,
            offline_store=offline_store, secret_file=_run_secret(cfg, run_dir))
        wiring.save(run_dir / "wiring.json")
        py = [sys.executable, "-m"]
        children.append(Child.spawn("learner", site.learner_command(cfg, run_dir),
                                    logs / "learner.log", {"OMP_NUM_THREADS": "1"}))
        children.append(Child.spawn("orchestrator", py + ["megatron_opd.orchestrator", "--run-dir",
                                                          str(run_dir)], logs / "orchestrator.log",
                                    {"OMP_NUM_THREADS": "1"}))
        t_train = time.time()
        _supervise(cfg, run_dir, servers, children)
        train_seconds = time.time() - t_train
    finally:
        signal.signal(signal.SIGTERM, previous_term)
        signal.signal(signal.SIGINT, previous_int)
        if preempt_signal is not None:
            signal.signal(preempt_signal, previous_preempt)
        for c in reversed(children):
            c.stop()
        for s in servers:
            s.stop()
    records = read_metrics(run_dir / "metrics.jsonl")
    plot_curves(run_dir / "metrics.jsonl", run_dir / "curves.png")
    preempted = preemption.was_preempted(run_dir)
    if preempted is not None:  # stopped early with a checkpoint: no final evaluation
        return {"preempted": preempted, "train_seconds": train_seconds,
                "total_seconds": time.time() - t_start}
    summary = _summary(records, train_seconds, time.time() - t_start, models.meta)
    if (run_dir / RESTARTS_FILE).exists():
        summary["server_restarts"] = json.loads((run_dir / RESTARTS_FILE).read_text())
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _run_secret(cfg: Config, run_dir: Path) -> str:
    """The HMAC key of this run's ZeroMQ messages: the configured file, or one made for the run
    (mode 0600, kept across resumes). Authenticating on loopback too costs little (samples are
    small) and keeps one code path."""
    from megatron_opd.transport import load_secret, write_secret

    path = Path(cfg.transport.secret_file) if cfg.transport.secret_file else run_dir / "transport.key"
    if not cfg.transport.secret_file and not path.exists():
        write_secret(path)
    load_secret(path)  # refuses a missing or group/world-readable file, naming it
    return str(path)


def server_options(cfg: Config) -> dict:
    """SGLangServer keyword arguments every server of a run shares (`server.*`)."""
    sv = cfg.server
    return dict(dtype=sv.dtype, max_total_tokens=sv.max_total_tokens, threads=sv.threads or None)


def make_servers(cfg: Config, models, logs: Path) -> dict:
    """The run's SGLang servers (not started), as fleets of one on this machine: the teacher, and
    the rollout server with the student init at weight version 0 (`models`: envs.RunModels)."""
    from megatron_opd.serving.sglang_server import SGLangServer

    common = server_options(cfg)
    return {
        "teacher": [SGLangServer("teacher", str(models.teacher_dir), _free_port(),
                                 str(logs / "teacher.log"), **common)],
        "rollout": [SGLangServer("rollout", str(models.student_dir), _free_port(),
                                 str(logs / "rollout.log"), extra_args=("--weight-version", "0"),
                                 enable_return_routed_experts=cfg.train.routing_replay == "r3",
                                 **common)],
    }


def _learner_command(cfg: Config, run_dir: Path) -> list[str]:
    """One learner process, or torchrun with `parallel.world_size` ranks on this machine (it
    forwards SIGTERM to its ranks, so stopping its process group stops them)."""
    module = ["-m", "megatron_opd.learner.main", "--run-dir", str(run_dir)]
    world = cfg.parallel.world_size
    if world == 1:
        return [sys.executable, *module]
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={world}",
            f"--master-port={_free_port()}", "--master-addr=127.0.0.1", *module]


def _raise_terminated(signum, frame):
    raise Terminated(f"signal {signum}")


def _supervise(cfg: Config, run_dir: Path, servers, children: list[Child]) -> None:
    """Wait for the learner to finish; fail fast, naming the process, if the learner or the
    orchestrator dies; restart a dead SGLang server (bounded: server.max_restarts each)."""
    from tqdm import tqdm

    from megatron_opd.serving.sglang_server import ServerRestartLimit, ServerSupervisor

    supervisor = ServerSupervisor(servers, cfg.server.max_restarts,
                                  run_dir / RESTARTS_FILE)

    learner = children[0]
    bar = tqdm(total=cfg.train.steps, desc="train", unit="step", disable=not cfg.logging.progress)
    metrics_path = run_dir / "metrics.jsonl"
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
            _update_bar(bar, metrics_path)
            time.sleep(0.5)
        _update_bar(bar, metrics_path)
    finally:
        bar.close()


def _update_bar(bar, metrics_path: Path) -> None:
    if not metrics_path.exists():
        return
    records = [r for r in read_metrics(metrics_path) if "train/loss" in r]
    if len(records) > bar.n:
        last = records[-1]
        bar.update(len(records) - bar.n)
        shown = {"loss": f"{last['train/loss']:.3f}", "kl": f"{last['eval/reverse_kl']:.3f}"}
        if "eval/accuracy" in last:
            shown["acc"] = f"{last['eval/accuracy']:.2f}"
        bar.set_postfix(**shown, v=last["weights/version"])


def _summary(records: list[dict], train_seconds: float, total_seconds: float, prepared: dict) -> dict:
    first = next(r for r in records if r.get("eval/version") == 0)
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


def precompute_teacher(cfg: Config):
    """`megatron-opd precompute-teacher`: the offline store of this config, made if missing
    (starts a rollout server with the student init and a teacher server, and stops both)."""
    from megatron_opd.envs import prepare_models
    from megatron_opd.offline_build import build_store
    from megatron_opd.offline_store import open_store, store_key, store_path

    store = open_store(store_path(cfg), store_key(cfg))
    if store is not None:
        return store
    check_startable(cfg)
    models = prepare_models(cfg, progress=cfg.logging.progress)
    path = store_path(cfg)
    logs = path.with_name(path.name + ".logs")
    fleets = make_servers(cfg, models, logs)
    servers = fleets["rollout"] + fleets["teacher"]
    try:
        for s in servers:
            s.start()
        for s in servers:
            s.wait_ready(timeout=cfg.server.start_timeout_s)
        return build_store(cfg, fleets["rollout"][0].url, fleets["teacher"][0].url,
                           str(models.student_dir), progress=cfg.logging.progress)
    finally:
        for s in servers:
            s.stop()
