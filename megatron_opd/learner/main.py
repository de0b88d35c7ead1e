"""The learner process: receive samples, train the student with OPD, publish weights, log.

`python -m megatron_opd.learner.main --run-dir DIR` reads DIR/config.yaml (resolved) and
DIR/wiring.json (where the servers and sockets are). Policy version v = number of optimizer steps
published; the rollout server starts at version 0 (the student's init).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import time
from pathlib import Path

import torch

from megatron_opd.config import Config, load_config
from megatron_opd.learner.batch import collate, response_logprobs
from megatron_opd.learner.checkpoint import save_final_checkpoint
from megatron_opd.learner.evaluate import evaluate
from megatron_opd.metrics import MetricsWriter
from megatron_opd.objectives import sampled_token_opd_loss
from megatron_opd.task import DigitTask
from megatron_opd.transport import Sample, SampleReceiver, ControlPublisher, WeightsPublished, Shutdown
from megatron_opd.wiring import RunWiring


def run_learner(cfg: Config, wiring: RunWiring) -> dict:
    from megatron_opd.compat.megatron_cpu import install_megatron_cpu_compat
    from megatron_opd.config import ParallelConfig
    from megatron_opd.learner.parallel import destroy_distributed, init_distributed
    from megatron_opd.models.hf_mapping import iter_hf_weights, load_hf_checkpoint
    from megatron_opd.models.qwen3_moe import build_gpt_model, forward_logits
    from megatron_opd.serving.sglang_client import SGLangClient

    run_dir = Path(wiring.run_dir)
    torch.manual_seed(cfg.run.seed)
    install_megatron_cpu_compat()
    init_distributed(cfg.parallel, seed=cfg.run.seed)

    task = DigitTask.from_config(cfg.task, cfg.model.vocab_size)
    spec = dataclasses.replace(cfg.model, bos_token_id=task.bos, eos_token_id=task.eos,
                               pad_token_id=task.pad)
    model = build_gpt_model(spec)
    load_hf_checkpoint(model, wiring.student_dir, spec)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay,
                                  betas=(cfg.train.adam_beta1, cfg.train.adam_beta2))
    warmup = max(1, cfg.train.warmup_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup))

    rollout = SGLangClient(wiring.rollout_urls[0], timeout=cfg.server.request_timeout_s)
    teacher = SGLangClient(wiring.teacher_urls[0], timeout=cfg.server.request_timeout_s)
    receiver = SampleReceiver(wiring.samples_endpoint)
    control = ControlPublisher(wiring.control_endpoint)
    publisher = _make_publisher(cfg, wiring, rollout)
    metrics = MetricsWriter(run_dir, tensorboard=cfg.logging.tensorboard)
    eval_set = task.eval_set(cfg.task.num_eval_prompts, cfg.run.seed)

    def run_eval(version: int) -> dict:
        model.eval()
        out = evaluate(model, task, eval_set, rollout, teacher, version, spec.vocab_size,
                       cfg.rollout.max_new_tokens, seed=cfg.run.seed + version)
        model.train()
        return out

    version, dropped_tokens, skipped_steps, seen_ids = 0, 0, 0, set()
    last_eval = run_eval(version)
    control.publish(WeightsPublished(version=0, step=0, published_at=time.time()))
    for step in range(cfg.train.steps):
        t0 = time.time()
        samples = _receive(receiver, control, cfg.train.batch_size, version, seen_ids)
        t_wait = time.time() - t0
        batch, stale = collate(samples, task.pad, version, cfg.async_.max_staleness)
        dropped_tokens += stale.dropped_tokens

        logits = forward_logits(model, batch.input_ids)
        logprobs = response_logprobs(logits, batch)
        o = cfg.objective
        loss, terms = sampled_token_opd_loss(
            logprobs, batch.behaviour_logprobs, batch.teacher_logprobs, batch.loss_mask,
            kl_coef=o.kl_coef, kl_logprobs=o.kl_logprobs, discount=o.discount,
            clip_eps_low=o.clip_eps_low, clip_eps_high=o.clip_eps_high)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip or math.inf)
        t_sync = 0.0
        if torch.isfinite(loss) and torch.isfinite(grad_norm):
            optimizer.step()
            scheduler.step()
            version += 1
            t_sync = publisher.publish(iter_hf_weights(model, spec), version)
            control.publish(WeightsPublished(version=version, step=step + 1, published_at=time.time()))
        else:  # never publish weights made from a non-finite step
            skipped_steps += 1
        if version % cfg.eval.interval == 0 or step == cfg.train.steps - 1:
            last_eval = run_eval(version)
        metrics.log(step, {
            "train/loss": loss.item(), "train/grad_norm": grad_norm.item(),
            "train/lr": scheduler.get_last_lr()[0], "train/skipped_steps": skipped_steps,
            **{f"train/{k}": v for k, v in terms.items()},
            **last_eval,
            "samples/count": len(samples), "samples/staleness_mean": stale.staleness_mean,
            "samples/staleness_max": stale.staleness_max,
            "samples/version_min": min(int(x.token_versions.min()) for x in samples),
            "samples/version_max": max(int(x.token_versions.max()) for x in samples),
            "samples/dropped_stale_tokens": dropped_tokens,
            "samples/rejected_messages": receiver.stats["rejected_total"],
            "weights/version": version, "time/wait_samples_s": t_wait,
            "time/weight_sync_s": t_sync, "time/step_s": time.time() - t0,
        })
    metrics.log(cfg.train.steps, {**last_eval, "weights/version": version})
    metrics.close()
    if cfg.train.checkpoint:
        save_final_checkpoint(model, optimizer, spec, version, run_dir, wiring.student_dir)
    control.publish(Shutdown(reason="training finished"))
    publisher.close()
    destroy_distributed()
    return last_eval


def _make_publisher(cfg: Config, wiring: RunWiring, rollout):
    from megatron_opd.weight_sync import DiskWeightPublisher, DistributedWeightPublisher

    if cfg.weight_sync.method == "disk":
        return DiskWeightPublisher([rollout], directory=Path(wiring.run_dir) / "weights",
                                   base_model_dir=wiring.student_dir)
    pub = DistributedWeightPublisher([rollout], master_addr=wiring.weight_sync_master_addr,
                                     master_port=wiring.weight_sync_master_port or None,
                                     backend=cfg.weight_sync.backend)
    pub.connect()
    return pub


def _receive(receiver, control, n: int, version: int, seen_ids: set) -> list[Sample]:
    """Block until n new samples arrived; re-announce the version while waiting (PUB/SUB may have
    dropped it before the orchestrator subscribed). Duplicate sample ids are never trained twice."""
    samples: list[Sample] = []
    last_announce = time.time()
    while len(samples) < n:
        msg = receiver.recv(timeout_ms=500)
        if isinstance(msg, Sample) and msg.sample_id not in seen_ids:
            seen_ids.add(msg.sample_id)
            samples.append(msg)
        if time.time() - last_announce > 2.0:
            control.publish(WeightsPublished(version=version, step=version, published_at=time.time()))
            last_announce = time.time()
    return samples


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="megatron_opd.learner.main")
    parser.add_argument("--run-dir", required=True)
    args = parser.parse_args(argv)
    run_dir = Path(args.run_dir)
    cfg = load_config(run_dir / "config.yaml")
    run_learner(cfg, RunWiring.load(run_dir / "wiring.json"))
    return 0


if __name__ == "__main__":  # dist_checkpointing spawns helpers: keep the guard
    sys.exit(main())
