"""The orchestrator process: prompts → rollout fleet → teacher fleet → samples to the learner.

Generation runs ahead of training (asynchronous) but only within the staleness budget: a new
request is admitted while `started + k <= (version + max_staleness + 1) * batch_size`, so with
in-order consumption a sample started at version v is trained by step v + max_staleness. The
learner enforces the bound per token anyway (and counts what it drops).

`python -m megatron_opd.orchestrator --run-dir DIR` (reads DIR/config.yaml and DIR/wiring.json).
"""

from __future__ import annotations

import argparse
import itertools
import queue
import sys
import threading
import time
from pathlib import Path

import numpy as np

from megatron_opd.config import Config, load_config
from megatron_opd.task import DigitTask
from megatron_opd.transport import (ControlSubscriber, Sample, SampleSender, Shutdown,
                                    WeightsPublished)
from megatron_opd.wiring import RunWiring


class Admission:
    """The staleness budget shared by the generation workers."""

    def __init__(self, batch_size: int, max_staleness: int):
        self.batch_size, self.max_staleness = batch_size, max_staleness
        self.version, self.started, self.stopped = 0, 0, False
        self._cv = threading.Condition()

    def acquire(self, k: int) -> bool:
        """Block until k more samples may start; False once stopped."""
        with self._cv:
            while not self.stopped and \
                    self.started + k > (self.version + self.max_staleness + 1) * self.batch_size:
                self._cv.wait(timeout=1.0)
            if self.stopped:
                return False
            self.started += k
            return True

    def set_version(self, version: int) -> None:
        with self._cv:
            if version > self.version:
                self.version = version
                self._cv.notify_all()

    def stop(self) -> None:
        with self._cv:
            self.stopped = True
            self._cv.notify_all()


def _compact(routed: np.ndarray | None) -> np.ndarray | None:
    """Expert ids in the narrowest integer type the schema allows (fewer bytes on the wire)."""
    if routed is None:
        return None
    top = int(routed.max(initial=0))
    return routed.astype(np.uint8 if top < 256 else np.int16 if top < 32768 else np.int32)


def make_samples(cfg: Config, examples, results, scores, ids) -> list[Sample]:
    out = []
    for ex, res, sc, sid in zip(examples, results, scores, ids):
        n = len(res.output_ids)
        if n == 0:
            continue
        k = cfg.teacher.top_k
        out.append(Sample(
            sample_id=sid, group_id=sid,
            prompt_ids=np.asarray(ex.prompt_ids, dtype=np.int32),
            response_ids=np.asarray(res.output_ids, dtype=np.int32),
            loss_mask=np.ones(n, dtype=np.uint8),  # single-turn task: every response token trains
            behaviour_logprobs=np.asarray(res.output_logprobs, dtype=np.float32),
            token_versions=np.asarray(res.token_versions, dtype=np.int64),
            teacher_logprobs=np.asarray(sc.logprobs, dtype=np.float32),
            teacher_topk_ids=np.asarray(sc.topk_ids, dtype=np.int32).reshape(n, k),
            teacher_topk_logprobs=np.asarray(sc.topk_logprobs, dtype=np.float32).reshape(n, k),
            teacher_revision=cfg.teacher.revision, routed_experts=_compact(res.routed_experts),
            reward=0.0,
            metadata={"op": ex.op}, created_at=time.time(), finish_reason=res.finish_reason,
        ))
    return out


def run_orchestrator(cfg: Config, wiring: RunWiring) -> None:
    from megatron_opd.serving.sglang_client import SGLangClient

    task = DigitTask.from_config(cfg.task, cfg.model.vocab_size)
    held_out = {ex.prompt_ids for ex in task.eval_set(cfg.task.num_eval_prompts, cfg.run.seed)}
    stream = task.train_stream(cfg.run.seed + 3, held_out)
    stream_lock = threading.Lock()
    counter = itertools.count()
    rollout = SGLangClient(wiring.rollout_urls[0], timeout=cfg.server.request_timeout_s)
    teacher = SGLangClient(wiring.teacher_urls[0], timeout=cfg.server.request_timeout_s)
    admission = Admission(cfg.train.batch_size, cfg.async_.max_staleness)
    ready: queue.Queue[Sample] = queue.Queue()
    errors: list[BaseException] = []
    sampling = {"temperature": cfg.rollout.temperature, "top_p": cfg.rollout.top_p,
                "max_new_tokens": cfg.rollout.max_new_tokens, "stop_token_ids": [task.eos]}
    k = cfg.rollout.prompts_per_request

    def worker() -> None:
        try:
            while admission.acquire(k):
                with stream_lock:
                    examples = [next(stream) for _ in range(k)]
                    ids = [f"{cfg.run.name}-{next(counter):09d}" for _ in range(k)]
                prompts = [list(ex.prompt_ids) for ex in examples]
                results = rollout.generate(
                    prompts, sampling, return_logprob=True,
                    return_routed_experts=cfg.train.routing_replay == "r3",
                    routed_experts_shape=(cfg.model.num_layers, cfg.model.moe_router_topk))
                scores = teacher.score([p + list(r.output_ids) for p, r in zip(prompts, results)],
                                       start=[len(p) for p in prompts], top_k=cfg.teacher.top_k)
                for s in make_samples(cfg, examples, results, scores, ids):
                    ready.put(s)
        except BaseException as e:  # surface in the main thread: the process must die loudly
            errors.append(e)
            admission.stop()

    threads = [threading.Thread(target=worker, daemon=True, name=f"rollout-{i}")
               for i in range(cfg.rollout.max_inflight_requests)]
    sender = SampleSender(wiring.samples_endpoint)
    control = ControlSubscriber(wiring.control_endpoint)
    for t in threads:
        t.start()
    sent = 0
    try:
        while not admission.stopped:
            for msg in control.poll(timeout_ms=50):
                if isinstance(msg, WeightsPublished):
                    admission.set_version(msg.version)
                elif isinstance(msg, Shutdown):
                    print(f"[orchestrator] shutdown: {msg.reason}", flush=True)
                    admission.stop()
            while not ready.empty():
                sample = ready.get_nowait()
                while not sender.send(sample, timeout_ms=1000):
                    if admission.stopped:
                        break
                sent += 1
                if sent % 100 == 0:
                    print(f"[orchestrator] sent {sent} samples, version {admission.version}, "
                          f"started {admission.started}", flush=True)
        if errors:
            raise errors[0]
    finally:
        admission.stop()
        sender.close()
        control.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="megatron_opd.orchestrator")
    parser.add_argument("--run-dir", required=True)
    args = parser.parse_args(argv)
    run_dir = Path(args.run_dir)
    run_orchestrator(load_config(run_dir / "config.yaml"), RunWiring.load(run_dir / "wiring.json"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
