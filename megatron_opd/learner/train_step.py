"""One optimizer step of a megatron model under any layout: micro-batches through megatron's
pipeline schedule, gradients reduced by megatron DDP, megatron's (distributed) optimizer.

Loss convention (`calculate_per_token_loss`): a loss function returns the *sum* of its per-token
losses over one micro-batch and the number of tokens; megatron divides every gradient by the
global token count (all micro-batches, all data-parallel ranks) once. The result is the token
mean over the whole batch, whatever the split, which is what makes layouts interchangeable.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from functools import partial
from typing import Callable

import torch
import torch.distributed as dist

from megatron_opd.models.qwen3_moe import causal_attention_mask


@dataclass
class MicroBatch:
    """input_ids [b, s] right-padded; `data` holds what the loss needs, batch-first tensors."""
    input_ids: torch.Tensor
    data: dict[str, torch.Tensor] = field(default_factory=dict)
    index: int = 0  # position in the step's list of micro-batches (set by forward_backward)


Hook = Callable[[MicroBatch, torch.nn.Module], None]

# loss_fn(vocab-sharded logits [b, s, V/tp] float, micro-batch) -> (sum of per-token losses,
# token count, {metric name: (sum, count)} for logging)
LossFn = Callable[[torch.Tensor, MicroBatch], tuple[torch.Tensor, torch.Tensor, dict]]


@dataclass
class StepResult:
    loss: float  # token mean over the global batch
    tokens: int
    grad_norm: float
    stepped: bool  # False: non-finite loss or gradients, nothing was applied
    metrics: dict[str, float]


def wrap_for_training(chunks: list, train_cfg, groups, precision=None):
    """Megatron DDP around each chunk, the megatron optimizer and LR schedule. `precision` (a
    models.precision.ResolvedPrecision) adds its FP8 settings to DDP and the optimizer."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    config = chunks[0].config
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, use_distributed_optimizer=train_cfg.distributed_optimizer,
        **(precision.ddp_config_kwargs() if precision else {}))
    ddp = [DistributedDataParallel(config, ddp_config, c, disable_bucketing=i > 0)
           for i, c in enumerate(chunks)]
    config.finalize_model_grads_func = finalize_model_grads
    opt_config = OptimizerConfig(
        optimizer="adam", lr=train_cfg.lr, min_lr=train_cfg.min_lr,
        weight_decay=train_cfg.weight_decay, adam_beta1=train_cfg.adam_beta1,
        adam_beta2=train_cfg.adam_beta2, adam_eps=1e-8, clip_grad=train_cfg.grad_clip,
        bf16=config.bf16, fp16=config.fp16, params_dtype=config.params_dtype,
        use_distributed_optimizer=train_cfg.distributed_optimizer,
        **(precision.optimizer_config_kwargs() if precision else {}))
    optimizer = get_megatron_optimizer(opt_config, ddp)
    warmup = min(train_cfg.warmup_steps, train_cfg.steps - 1)
    # megatron's schedule gives step k the LR init + (max - init) * k / warmup, so step 0 would
    # run at init_lr: start at lr / warmup rather than waste the first step at 0.
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=train_cfg.lr / warmup if warmup else train_cfg.lr, max_lr=train_cfg.lr,
        min_lr=train_cfg.min_lr, lr_warmup_steps=warmup,
        lr_decay_steps=train_cfg.steps, lr_decay_style=train_cfg.lr_decay_style,
        start_wd=train_cfg.weight_decay, end_wd=train_cfg.weight_decay,
        wd_incr_steps=train_cfg.steps, wd_incr_style="constant")
    return ddp, optimizer, scheduler


def forward_backward(ddp: list, microbatches: list[MicroBatch], loss_fn: LossFn, groups,
                     forward_only: bool = False, pre_forward: Hook | None = None,
                     post_forward: Hook | None = None) -> tuple[float, int, dict[str, float]]:
    """Run all micro-batches through the pipeline; returns (global token-mean loss, global token
    count, global token-mean metrics), the same on every rank. `pre_forward` / `post_forward`
    run around each model-chunk forward of a micro-batch (e.g. routing replay)."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    seq = max(mb.input_ids.shape[1] for mb in microbatches)
    tp = groups.layout.tensor_parallel
    seq = -(-seq // tp) * tp  # sequence parallelism splits positions evenly over TP ranks
    mbs = microbatches[0].input_ids.shape[0]
    device = _device()
    microbatches = [_to(dataclasses.replace(_pad_to(mb, seq), index=i), device)
                    for i, mb in enumerate(microbatches)]
    mask = causal_attention_mask(seq, device)
    positions = torch.arange(seq, device=device).unsqueeze(0)

    def forward_step(data_iterator, model):
        mb = next(data_iterator)
        if pre_forward is not None:
            pre_forward(mb, model)
        out = model(mb.input_ids, positions.expand_as(mb.input_ids), mask)
        if post_forward is not None:
            post_forward(mb, model)
        return out, partial(_loss_adapter, loss_fn, mb)

    vpp = len(ddp)
    iters = [iter(microbatches) for _ in range(vpp)] if vpp > 1 else iter(microbatches)
    if not forward_only:
        for model in ddp:
            model.zero_grad_buffer()
    reduced = get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iters, model=ddp if vpp > 1 else ddp[0],
        num_microbatches=len(microbatches), seq_length=seq, micro_batch_size=mbs,
        forward_only=forward_only)
    return _reduce_metrics(reduced, groups)


def _loss_adapter(loss_fn: LossFn, mb: MicroBatch, logits: torch.Tensor):
    loss_sum, tokens, metrics = loss_fn(logits, mb)
    tokens = torch.as_tensor(tokens, dtype=torch.int, device=loss_sum.device)
    # Reported values go to the CPU (one sync per micro-batch): totals travel over gloo.
    cpu = lambda x: torch.as_tensor(x).detach().double().cpu()  # noqa: E731
    report = {"loss": (cpu(loss_sum), cpu(tokens))}
    report.update({k: (cpu(s), cpu(n)) for k, (s, n) in metrics.items()})
    return loss_sum, tokens, report


def _reduce_metrics(reduced: list[dict], groups) -> tuple[float, int, dict[str, float]]:
    """Sum (value, count) pairs over micro-batches (last stage) and data-parallel ranks, then
    share them with every pipeline stage."""
    keys = sorted(reduced[0]) if reduced else []
    n_keys = torch.tensor([len(keys)], dtype=torch.float64)
    last = dist.get_global_rank(groups.pp, groups.layout.pipeline_parallel - 1)
    if groups.layout.pipeline_parallel > 1:
        dist.broadcast(n_keys, src=last, group=groups.pp)
    totals = torch.zeros(int(n_keys.item()), 2, dtype=torch.float64)
    for rep in reduced:
        for i, k in enumerate(keys):
            totals[i, 0] += rep[k][0]
            totals[i, 1] += rep[k][1]
    if groups.layout.pipeline_parallel > 1:
        dist.broadcast(totals, src=last, group=groups.pp)
        keys = _broadcast_keys(keys, groups, last)
    dist.all_reduce(totals, group=groups.dp)
    means = {k: (totals[i, 0] / totals[i, 1]).item() if totals[i, 1] > 0 else 0.0
             for i, k in enumerate(keys)}
    loss = means.pop("loss")
    return loss, int(totals[keys.index("loss"), 1].item()), means


def _broadcast_keys(keys: list[str], groups, src: int) -> list[str]:
    """Metric names from the last stage (encoded as bytes in a tensor: no pickling)."""
    data = torch.tensor(list("\n".join(keys).encode()), dtype=torch.uint8)
    size = torch.tensor([data.numel()])
    dist.broadcast(size, src=src, group=groups.pp)
    buf = data if groups.is_last_stage else torch.empty(int(size.item()), dtype=torch.uint8)
    dist.broadcast(buf, src=src, group=groups.pp)
    return bytes(buf.tolist()).decode().split("\n")


def _device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() \
        else torch.device("cpu")


def _to(mb: MicroBatch, device: torch.device) -> MicroBatch:
    if device.type == "cpu":
        return mb
    return MicroBatch(mb.input_ids.to(device, non_blocking=True),
                      {k: v.to(device, non_blocking=True) for k, v in mb.data.items()}, mb.index)


def split_microbatches(batch, fields: tuple[str, ...], groups, micro_batch_size: int) -> list[MicroBatch]:
    """This data-parallel rank's share of a global batch (a dataclass of batch-first tensors with
    `input_ids`), cut into micro-batches."""
    B = batch.input_ids.shape[0]
    if B % (groups.dp_size * micro_batch_size):
        raise ValueError(f"train.batch_size: {B} samples do not split into {groups.dp_size} "
                         f"data-parallel ranks x micro-batches of {micro_batch_size}")
    per = B // groups.dp_size
    rows = slice(groups.dp_rank * per, (groups.dp_rank + 1) * per)
    mine = {f: getattr(batch, f)[rows] for f in ("input_ids", *fields)}
    return [MicroBatch(mine["input_ids"][i:i + micro_batch_size],
                       {f: mine[f][i:i + micro_batch_size] for f in fields})
            for i in range(0, per, micro_batch_size)]


def _pad_to(mb: MicroBatch, seq: int) -> MicroBatch:
    pad = seq - mb.input_ids.shape[1]
    if pad == 0:
        return mb
    ids = torch.nn.functional.pad(mb.input_ids, (0, pad))  # right padding: causal => no effect
    data = {k: _pad_seq(v, pad) if k in SEQUENCE_FIELDS else v for k, v in mb.data.items()}
    return MicroBatch(ids, data, mb.index)


# Micro-batch tensors laid out per input position ([b, s, ...]): padded with the input ids.
SEQUENCE_FIELDS = ("routed_experts",)


def _pad_seq(t: torch.Tensor, pad: int) -> torch.Tensor:
    """Right-pad dim 1 by repeating the last position (any valid value is exact: causal)."""
    return torch.cat([t, t[:, -1:].expand(-1, pad, *t.shape[2:])], dim=1)


def optimizer_step(optimizer, scheduler, loss: float) -> tuple[bool, float]:
    """Apply the gradients unless the loss or the global gradient norm is not finite (then the
    step is skipped: nothing changes, the caller counts it and publishes nothing)."""
    found_inf = optimizer.prepare_grads()
    grad_norm = optimizer.get_grad_norm()
    grad_norm = float(grad_norm) if grad_norm is not None else 0.0
    if found_inf or not math.isfinite(grad_norm) or not math.isfinite(loss):
        return False, grad_norm
    ok, _, _ = optimizer.step()
    if ok:
        scheduler.step(increment=1)
    return bool(ok), grad_norm
