"""Making an offline OPD store (ALGORITHMS.md §9) with running servers: the student init's
rollouts of the environment's training stream, scored by the teacher exactly as the live
orchestrator scores them. The format itself is megatron_opd/offline_store.py (which starts
nothing); `megatron-opd precompute-teacher` starts the servers (megatron_opd/launch/local.py).
"""

from __future__ import annotations

import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor

from megatron_opd.config import Config
from megatron_opd.offline_store import OfflineStore, open_store, store_config, store_key, \
    store_path, write_store
from megatron_opd.transport import Sample


def generate_samples(cfg: Config, rollout, teacher, student_dir: str,
                     progress: bool = False) -> list[Sample]:
    """`teacher.offline_samples` samples, rounded up to whole groups, from the run's training
    stream, made and scored exactly as the live orchestrator makes them, in a deterministic
    order."""
    from tqdm import tqdm

    from megatron_opd.envs import make_env
    from megatron_opd.orchestrator import rollout_and_score

    env = make_env(cfg, student_dir)
    stream = env.train_prompts()
    k, want = cfg.rollout.prompts_per_request, cfg.teacher.offline_samples
    samples: list[Sample] = []
    counter = 0
    bar = tqdm(total=want, desc="precompute teacher", unit="sample", disable=not progress)

    def submit(pool):
        nonlocal counter
        examples = [next(stream) for _ in range(k)]
        ids = [f"offline-{counter + i:09d}" for i in range(k)]
        counter += k
        return pool.submit(rollout_and_score, cfg, env, rollout, teacher, examples, ids)

    with ThreadPoolExecutor(cfg.rollout.max_inflight_requests) as pool:
        pending = deque(submit(pool) for _ in range(cfg.rollout.max_inflight_requests))
        while len(samples) < want:
            for group in pending.popleft().result():  # in submission order: deterministic
                if len(samples) < want:
                    samples.extend(group)
                    bar.update(len(group))
            if len(samples) < want:
                pending.append(submit(pool))
        for f in pending:
            f.cancel()
    bar.close()
    return samples


def build_store(cfg: Config, rollout_url: str, teacher_url: str, student_dir: str,
                progress: bool = False) -> OfflineStore:
    """Reuse the store of this config, or make it with the given servers (the rollout server
    must serve the student init, version 0)."""
    from megatron_opd.serving.sglang_client import SGLangClient
    from megatron_opd.serving.teachers import TeacherRouter

    path, key = store_path(cfg), store_key(cfg)
    store = open_store(path, key)
    if store is not None:
        return store
    t0 = time.time()
    timeout = cfg.server.request_timeout_s
    # offline mode has one teacher (config validation): the router over its one client
    teacher = TeacherRouter.single(cfg, SGLangClient(teacher_url, timeout=timeout))
    samples = generate_samples(cfg, SGLangClient(rollout_url, timeout=timeout), teacher,
                               student_dir, progress)
    write_store(path, samples, key, extra={"config": store_config(cfg),
                                           "seconds": time.time() - t0})
    print(f"[offline] stored {len(samples)} teacher-scored samples in {path} "
          f"({time.time() - t0:.0f} s)", flush=True)
    return open_store(path, key)
