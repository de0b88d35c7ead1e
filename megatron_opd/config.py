"""One typed config tree for a run.

YAML supplies values, `key.sub=value` dotlist overrides come from the command line, and every
section validates itself with messages that name the offending key. Unknown or ill-typed keys fail
before any process starts. The resolved tree is saved as `config.yaml` in the run directory.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from megatron_opd.models.precision import PrecisionConfig
from megatron_opd.models.spec import MoEModelSpec, check_hf_expressible


class ConfigError(ValueError):
    """A config value is unknown, ill-typed or invalid; the message names the dotted key."""


@dataclass
class RunConfig:
    name: str = "quickstart"
    dir: str = "runs/quickstart"  # artifacts: config.yaml, metrics.jsonl, curves.png, checkpoint
    seed: int = 0
    cache_dir: str = ".cache/megatron-opd"  # prepared models (teacher, student init), reused
    overwrite: bool = False  # refuse to reuse a run dir that already holds metrics unless set


@dataclass
class DigitsConfig:
    """The digits environment (the quickstart's toy): transform a digit string (reverse it, sort
    it ...). Exact answers give an accuracy, and a model trained on it longer is better at it."""
    ops: list[str] = field(default_factory=lambda: ["rev", "sort"])
    min_digits: int = 3
    max_digits: int = 7
    num_digits_symbols: int = 10


@dataclass
class CalculatorConfig:
    """The calculator tool environment (`env.name: calculator`, multi-turn): compute an integer
    expression; the model may call a calculator (a sandboxed subprocess) between its turns."""
    min_operands: int = 2
    max_operands: int = 4
    max_operand: int = 99  # operands are drawn from [1, max_operand]
    tool_timeout_s: float = 2.0  # wall clock (and CPU seconds, rounded up) of one tool call
    tool_memory_mb: int = 256  # address-space limit of the tool's process
    # Each must be one token of the student's tokenizer (Qwen's own tool-call tokens by default);
    # an assistant turn that ends with `call_end` is a tool call, its text after `call_start`
    # the expression.
    call_start: str = "<tool_call>"
    call_end: str = "</tool_call>"
    # The tokens appended after a tool call ({result}: the tool's output or its error), parsed
    # with the student's tokenizer (special tokens included): closes the assistant turn, gives
    # the result as a user turn and opens the next assistant turn (Qwen's ChatML by default).
    observation: str = ("<|im_end|>\n<|im_start|>user\n<tool_response>\n{result}\n"
                        "</tool_response><|im_end|>\n<|im_start|>assistant\n")


@dataclass
class EnvConfig:
    """What the run trains on (megatron_opd/envs/): `digits` (the quickstart's synthetic task,
    models made by `megatron-opd prepare`), `chat` (prompts from `data.*`, models from
    `init.*`) or `calculator` (multi-turn tool use, models from `init.*`)."""
    name: Literal["digits", "chat", "calculator"] = "digits"
    num_eval_prompts: int = 64  # held-out prompts per evaluation (chat: the first of data.eval)
    # Multi-turn environments: an episode ends after max_turns assistant turns, or once its
    # response (assistant and tool tokens after the prompt) would pass max_response_tokens.
    # rollout.max_new_tokens bounds each assistant turn.
    max_turns: int = 4
    max_response_tokens: int = 256
    # chat: the reward of a response whose prompt has a reference answer (`data.label_key`).
    # exact_match: 1.0 when the decoded response (special tokens and surrounding white space
    # removed) equals the answer; none: no verifier (reward 0, no eval/accuracy).
    verifier: Literal["exact_match", "none"] = "exact_match"
    digits: DigitsConfig = field(default_factory=DigitsConfig)
    calculator: CalculatorConfig = field(default_factory=CalculatorConfig)


@dataclass
class DataConfig:
    """Prompt datasets of the chat environment (docs/data.md): local JSONL or Parquet files (or
    a directory saved by HF `datasets`), one prompt per row."""
    train: str = ""
    eval: str = ""  # "": the first env.num_eval_prompts rows of a seeded shuffle of train, held out
    prompt_key: str = "messages"  # a list of {role, content}, or a plain string (a user message)
    label_key: str = "label"  # optional reference answer for the verifier
    apply_chat_template: bool = True  # the student tokenizer's template, with generation prompt
    max_prompt_tokens: int = 1024  # longer prompts are dropped and counted (data/dropped_prompts)
    bad_rows: Literal["error", "skip"] = "error"  # skip: malformed rows are counted, not fatal
    epochs: int = 0  # passes over data.train (0: endless); each epoch in a new seeded order


@dataclass
class PrepareConfig:
    """Supervised fine-tuning that makes the teacher (long) and the student's init (short)."""

    teacher_steps: int = 600
    student_steps: int = 140
    batch_size: int = 64
    lr: float = 3e-3
    # Label smoothing of the teacher's SFT (0: a confident teacher; >0 caps its log-ratios).
    teacher_label_smoothing: float = 0.0
    teacher_model: MoEModelSpec = field(default_factory=lambda: MoEModelSpec(
        hidden_size=128, num_layers=3, num_attention_heads=4, num_kv_heads=2, head_dim=32,
        moe_ffn_hidden_size=128, num_experts=8, moe_router_topk=2))


@dataclass
class ServerConfig:
    """SGLang servers started by the embedded launcher (teacher and rollout)."""

    start_timeout_s: float = 300.0
    request_timeout_s: float = 120.0
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    max_total_tokens: int = 16384  # KV-cache tokens per server (SGLang sizes it from RAM otherwise)
    threads: int = 1  # torch threads per server process (0: SGLang's default)
    # A server that dies is restarted on its port at most this many times (0: a death stops the
    # run); see docs/fault-tolerance.md.
    max_restarts: int = 3
    # A server that answered its probe, then none for this long, is killed and restarted (0: no
    # health check); above the publisher's 300 s gloo timeout (docs/fleets.md).
    health_timeout_s: float = 360.0
    # How requests reach a fleet of more than one server (rollout.num_servers, teacher.num_servers):
    # "smg", SGLang's model gateway (a router process in front of the fleet, `router_policy`), or
    # "client", our own client's round robin (the fallback where smg cannot run). One server: no
    # router either way.
    router: Literal["smg", "client"] = "smg"
    router_policy: Literal["cache_aware", "least_load", "round_robin", "power_of_two",
                           "random"] = "cache_aware"


@dataclass
class RolloutConfig:
    temperature: float = 1.0
    # null: resolved when validated, 0.9 when the objective has an lsm term (ALGORITHMS.md §2:
    # the LSM recipe samples with top-p 0.9; 1.0 hurts it), else 1.0. The saved config shows it.
    top_p: float | None = None
    max_new_tokens: int = 12
    prompts_per_request: int = 8  # prompts batched into one /generate call
    max_inflight_requests: int = 2
    # GRPO groups: responses sampled per prompt (one group_id, sent back to back; 1 = no groups).
    # A request then carries prompts_per_request x group_size sequences.
    group_size: int = 1
    num_servers: int = 1  # rollout SGLang servers of the embedded launcher (behind server.router)


@dataclass
class NamedTeacherConfig:
    """One of several teachers (`teacher.teachers`; docs/teachers.md)."""
    name: str = ""  # unique; a word (letters, digits, - _ .)
    init: str = ""  # its Hugging Face directory; "" = the run's teacher (init.teacher / prepared)
    revision: str = ""  # the id put on every sample it scores (teacher_revision); unique
    num_servers: int = 1  # its SGLang servers (behind server.router when more than one)
    # The route keys it serves (environment names or route_column values); [] = its name.
    routes: list[str] = field(default_factory=list)


@dataclass
class TeacherConfig:
    top_k: int = 0  # teacher top-K log-probs per token (0 = sampled token only)
    # What the teacher sends per response token (ALGORITHMS.md §10, docs/teachers.md): "sampled"
    # log q(y_t) (top_k 0); "topk" also the top_k best ids and log-probs (top_k >= 1); "hidden"
    # also its final hidden state (the learner applies the teacher's output head: the exact
    # distribution), with the top-K too when top_k >= 1. "auto" (old configs): topk when
    # top_k >= 1, else sampled; validation resolves it, so the saved config names the signal.
    signal: Literal["auto", "sampled", "topk", "hidden"] = "auto"
    # hidden: dtype of the hidden states on the wire (bfloat16: 2 B per value; float32: exact,
    # for parity checks at 1e-4)
    hidden_dtype: Literal["bfloat16", "float32"] = "bfloat16"
    num_servers: int = 1  # teacher SGLang servers of the embedded launcher (behind server.router)
    revision: str = "teacher-v0"
    # The temperature the teacher's log-probs are of (carried on every sample as
    # teacher_temperature; the distillation terms score the student at it: docs/temperatures.md).
    # Scoring requests ask for it; our servers apply it (a compat patch: SGLang alone scores
    # prompt tokens at 1), and the orchestrator measures what each server applies.
    temperature: float = 1.0
    # Several teachers (docs/teachers.md): [] = the one teacher above (init.teacher, revision,
    # num_servers). Listed: each sequence goes to the teacher that serves its route key, taken
    # from `route_by`: "env" the environment's name, "column" the prompt's `route_column` (a
    # dataset column). A key no teacher serves goes to `default` ("" = an error).
    teachers: list[NamedTeacherConfig] = field(default_factory=list)
    route_by: Literal["none", "env", "column"] = "none"
    route_column: str = ""
    default: str = ""
    # "live": the teacher server scores every rollout during training. "offline" (Lightning OPD,
    # ALGORITHMS.md §9): student rollouts of the init are scored once and stored; training reads
    # the store (no live teacher scoring; the teacher server only serves evaluation).
    mode: Literal["live", "offline"] = "live"
    offline_samples: int = 4096  # samples in the offline store (rounded up to whole groups)
    # Offline store directory; "" = <run.cache_dir>/offline/<hash of what made the data>.
    offline_store: str = ""
    # The teacher's architecture when it is a real checkpoint (`init.teacher`); null = the
    # quickstart teacher `prepare.teacher_model` that `megatron-opd prepare` trains.
    model: MoEModelSpec | None = None
    # Privileged self-distillation (OPSD, ALGORITHMS.md §10, docs/teachers.md). source "self":
    # the teacher is the student: teacher.num_servers servers started from the student init
    # that load the learner's published weights every `self_refresh` versions (1: the newest
    # policy; N: a lagged copy, at most N - 1 versions behind); samples carry teacher_revision
    # "self@v<version>". "external": init.teacher (or the prepared quickstart teacher).
    source: Literal["external", "self"] = "external"
    self_refresh: int = 1
    # prompt "privileged": the teacher scores the same response after a prompt that also holds
    # privileged text: `privileged_template` with {prompt} (the student's prompt text) and
    # {hint} (the row's `hint_key` column; the digits task: its answer), tokenised once per
    # prompt. "plain": the student's prompt.
    prompt: Literal["plain", "privileged"] = "plain"
    privileged_template: str = "{prompt}\n{hint}"
    hint_key: str = "hint"


@dataclass
class InitConfig:
    """Where the weights start: Hugging Face directories (config.json + safetensors) of the
    student init and the teacher; "" = made by `megatron-opd prepare` (the quickstart models)."""
    student: str = ""
    teacher: str = ""


@dataclass
class AsyncConfig:
    # A token generated by policy version v is trained at learner step s only if s - v <= bound.
    max_staleness: int = 2
    # Controlled staleness (the fidelity study, docs/fidelity.md): after step v the rollout fleet
    # gets the weights of version v - publish_lag (the learner keeps them), so with
    # max_staleness = publish_lag every token is trained exactly publish_lag versions late.
    # 0: publish the newest weights (production).
    publish_lag: int = 0


PROXIMAL = ("behaviour", "snapshot", "replica", "interrupt", "ewma", "loglinear", "linear")


@dataclass
class CorrectionConfig:
    """Off-policy correction under asynchrony (ALGORITHMS.md §6, §7; docs/off-policy.md).

    The policy-gradient ratio is split r = r_d * r_s: r_d = pi_old / mu (train-inference
    discrepancy at one version), r_s = pi_theta / pi_old (staleness, clipped with
    objective.clip_eps_low / clip_eps_high)."""
    # Where pi_old comes from: "behaviour" (mu stands in: r_d = 1), "snapshot" (parameters of
    # every version within async.max_staleness kept in CPU memory; each token rescored with its
    # own version), "replica" (a second model on the learner ranks at the rollout fleet's
    # version), "ewma" (PPO-EWMA proximal policy), "loglinear" / "linear" (AReaL-style
    # interpolation of mu and pi_theta by version: baselines), "interrupt" (before each weight
    # update the rollout fleet is paused and every token of the version being replaced is scored
    # with its weights; partial rollouts continue after the update).
    proximal: Literal["behaviour", "snapshot", "replica", "interrupt", "ewma", "loglinear",
                      "linear"] = "behaviour"
    # Treatment of r_d: "none" (ignored: weight 1), "tis" (weight min(r_d, c)), "mis" (mask
    # outside [1/c, c]), "icepop" (mask outside [1/c, c], weight r_d inside). With behaviour
    # pi_old = mu (r_d = 1), with snapshot / replica r_d is the numerical mismatch; with ewma
    # and the interpolations it also carries the staleness between the token's version and the
    # proximal policy, so "none" is refused there (the decoupled loss needs r_d).
    discrepancy: Literal["none", "tis", "mis", "icepop"] = "tis"
    # Level of r_d: per token, the sequence's product, or its geometric mean.
    discrepancy_level: Literal["token", "sequence", "geometric"] = "token"
    discrepancy_c: float = 2.0  # the band [1/c, c] (c > 1)
    # A sequence with any token r_d below this is rejected whole ("catastrophic"; 0: off).
    catastrophic_ratio: float = 1e-4
    # Dual clip (c > 1): for A < 0 the clipped loss is also bounded by c * |A| (0: off).
    dual_clip: float = 0.0
    # interrupt: how long the learner waits for the orchestrator's partial rollouts (then the
    # version's unscored tokens fall back to mu, counted)
    interrupt_timeout_s: float = 60.0
    ewma_beta: float = 0.0  # EWMA decay; 0: W / (W + 2) with W = async.max_staleness
    ewma_reset_tau: float = 0.9  # reset theta_prox <- theta when active fraction < tau (0: never)
    # Steps after an EWMA reset in which no other reset happens (0: none, the paper's rule). At
    # staleness 8 resets cascaded (one every other step) and training diverged on 2 of 3 seeds;
    # a cooldown of 8 held it, ewma_reset_tau=0 (no reset) did best: docs/fidelity.md.
    ewma_reset_cooldown: int = 0
    # Freshness control (§7): per-sample f_i = exp(-alpha * D_roll - beta * D_sup); "accept"
    # trains every sample as it is, "downweight" by f_i / mean f, "drop" those with f_i < min.
    freshness: Literal["accept", "downweight", "drop"] = "accept"
    freshness_alpha: float = 1.0  # per nat of token-mean |log pi_theta - log mu|
    freshness_beta: float = 0.25  # per version of teacher-context lag (and per revision change)
    freshness_min: float = 0.5  # drop threshold on f_i
    # Bound on the batch's token-mean rollout drift D_roll: the stalest samples leave the step
    # until the rest is within it (0: off).
    drift_budget: float = 0.0


@dataclass
class ParallelConfig:
    """The learner's megatron layout. The data-parallel size is what is left of the world size
    (world = TP x CP x PP x DP; experts: ETP x EP x PP x expert-DP). `validate_parallel` checks
    what the model alone decides; `learner.parallel.init_distributed` checks the world size."""
    world_size: int = 1  # learner processes (local: torchrun --nproc-per-node; Slurm: nodes x GPUs)
    tensor_parallel: int = 1
    pipeline_parallel: int = 1
    virtual_pipeline_parallel: int = 1  # model chunks per pipeline stage (interleaved 1F1B)
    expert_parallel: int = 1
    expert_tensor_parallel: int = 1  # TP of the experts (1 = experts whole, usual for MoE)
    context_parallel: int = 1  # needs Transformer Engine attention (GPU)
    sequence_parallel: bool = True  # only meaningful when tensor_parallel > 1
    micro_batch_size: int = 8  # samples per micro-batch (the pipeline's unit of work)


@dataclass
class TrainConfig:
    steps: int = 500
    batch_size: int = 64  # samples per optimizer step
    lr: float = 3e-4
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.99
    grad_clip: float = 1.0
    warmup_steps: int = 5
    min_lr: float = 0.0
    lr_decay_style: Literal["constant", "linear", "cosine"] = "constant"  # after warmup
    distributed_optimizer: bool = True  # shard optimizer state over data parallel (megatron)
    checkpoint: bool = True  # save the final checkpoint
    checkpoint_interval: int = 0  # also every N steps (0: final only)
    keep_checkpoints: int = 2  # newest complete checkpoints kept on disk
    resume: bool = True  # continue from run_dir/checkpoints/latest when it exists
    # MoE routing replay: "r3" forces the experts the rollout engine chose for each token.
    routing_replay: Literal["none", "r3"] = "none"


@dataclass
class LSMConfig:
    """Teacher top-K local support matching (ALGORITHMS.md §2); K is `teacher.top_k` (32 usual)."""
    log_ratio_clamp: float = 0.0  # clamp log pi^ - log q^ to +-c on the support (0: off; paper: 5)


@dataclass
class AOPDConfig:
    """Asymmetric OPD (§3): local top-K forward KL where q(y) - pi(y) <= tau, PG elsewhere."""
    tau: float = 0.0
    pg_form: Literal["clipped", "plain"] = "clipped"  # the PG term: §6 clipped ratio or -A log pi


@dataclass
class VOPDConfig:
    """vOPD (§4): closed-form KL(pi || q) baseline. "full" needs the teacher's whole distribution
    (teacher.top_k = model.vocab_size); "topk" renormalises both on the teacher's top-K."""
    support: Literal["topk", "full"] = "topk"


@dataclass
class TokenSelectionConfig:
    """TIP (§8): train on the top keep_ratio of tokens by soft-OR(entropy, divergence)."""
    method: Literal["none", "tip"] = "none"
    keep_ratio: float = 0.5
    divergence: Literal["sampled", "topk"] = "sampled"  # |log pi - log q| of y_t, or top-K fwd KL


@dataclass
class ObjectiveConfig:
    """The loss: a weighted sum of `terms` (megatron_opd/objectives/compose.py), each a pure
    function of tensors. Switch with e.g. `objective.terms=[lsm]` on the command line."""
    terms: list[str] = field(default_factory=lambda: ["sampled_token_opd"])
    name: str = ""  # shorthand: `objective.name=lsm` means terms=[lsm] (resolved when validated)
    weights: list[float] = field(default_factory=list)  # one per term (empty: all 1)
    kl_coef: float = 1.0  # lambda in A_t = -lambda * sg(log pi - log q)
    # Which student log-prob enters the reverse-KL sample k_t (ALGORITHMS.md §1).
    kl_logprobs: Literal["current", "behaviour", "old"] = "current"
    discount: float = 0.0  # gamma for the discounted suffix sum of A_t (0 = per token)
    clip_eps_low: float = 0.2
    clip_eps_high: float = 0.28
    # Special-token masking (§2 companion, applies to every term): the first occurrence in each
    # response of these tokens (strings of the student's tokenizer) leaves the loss.
    masked_tokens: list[str] = field(default_factory=list)
    # The ratio side (pi against mu) is softmax(logits / T) with the sampler's temperature T
    # (what SGLang's log-probs mean); false: T = 1 whatever the sampler did. Distillation terms
    # always use the sample's teacher_temperature (docs/temperatures.md).
    use_sampler_temperature: bool = True
    log_entropy: bool = True  # student entropy per token as a metric (one more pass per chunk)
    lsm: LSMConfig = field(default_factory=LSMConfig)
    aopd: AOPDConfig = field(default_factory=AOPDConfig)
    vopd: VOPDConfig = field(default_factory=VOPDConfig)
    token_selection: TokenSelectionConfig = field(default_factory=TokenSelectionConfig)


@dataclass
class TransportConfig:
    """The orchestrator -> learner sample channel (megatron_opd/transport/channel.py)."""
    # Run secret for the HMAC on every message (`megatron-opd keygen --out PATH`, mode 0600).
    # "": the embedded launcher makes one per run (run_dir/transport.key); sockets beyond
    # loopback refuse to start without one.
    secret_file: str = ""
    mac: Literal["hmac-sha256", "poly1305", "blake3"] = "hmac-sha256"  # docs/transport.md: speeds
    credit: int = 128  # samples in flight per orchestrator before the learner takes them
    resend_after_s: float = 60.0  # re-send a sample the learner has not taken by then
    max_unacked: int = 0  # bound on samples the orchestrator holds unacknowledged (0: none)


@dataclass
class WeightSyncConfig:
    method: Literal["distributed", "disk"] = "distributed"
    backend: Literal["gloo", "nccl"] = "gloo"
    bucket_mb: float = 64.0
    # How the rollout servers hold their running requests while weights change: "retract" (KV
    # freed, requests resume on the new weights), "abort" (requests return their partial output;
    # the orchestrator re-queues them), "in_place" (requests stay with their KV cache, computed by
    # the old weights: such samples are flagged; the update cannot flush the cache, so the
    # rollout servers run without a prefix cache, which the publisher checks). Every mode works
    # with both methods and with correction.proximal=interrupt (weight_sync.py, serving/resume.py).
    pause_mode: Literal["abort", "retract", "in_place"] = "retract"


@dataclass
class FleetConfig:
    """One SGLang fleet (rollout or teacher) in a Slurm job."""
    nodes: int = 1  # nodes of this fleet (a component of the heterogeneous job)
    gpus_per_server: int = 1  # SGLang tensor parallel size of one server (--tp-size)


@dataclass
class ClusterConfig:
    """Hardware of a Slurm run (launchers/slurm/): learner nodes run torchrun with the
    `parallel` layout over `learner_nodes x gpus_per_node` ranks; each fleet runs
    `gpus_per_node / gpus_per_server` servers per node (one per node on CPU nodes).
    `megatron-opd plan` checks it against the layout and sizes memory per GPU."""
    gpus_per_node: int = 8  # 0: CPU nodes (the single-node test cluster)
    gpu_memory_gib: float = 80.0  # per GPU (H100 80 GB; H200 141 GB)
    learner_nodes: int = 1
    rollout: FleetConfig = field(default_factory=FleetConfig)
    teacher: FleetConfig = field(default_factory=FleetConfig)


@dataclass
class SlurmConfig:
    """sbatch options of `launchers/slurm/submit.sh` (the node counts come from `cluster`)."""
    partition: str = ""
    account: str = ""
    qos: str = ""
    time_limit: str = "24:00:00"
    job_name: str = ""  # "" = run.name
    cpus_per_node: int = 0  # CPUs asked per node (0: Slurm's default)
    mem: str = ""  # --mem per node ("" = Slurm's default, "0" = all of it)
    # Preemption: Slurm sends SIGUSR1 this many seconds before the time limit; the learner
    # checkpoints at the next step and the job requeues itself (and resumes on restart).
    preempt_signal_s: int = 300
    requeue: bool = True
    max_requeues: int = 20  # a job restarted more often than this stops instead of requeuing
    # One heterogeneous job (learner | rollout | teacher components). False: one allocation of
    # the summed node counts, roles placed on its nodes in that order.
    heterogeneous: bool = True
    extra_sbatch: list[str] = field(default_factory=list)  # e.g. ["--constraint=h100"]
    setup: list[str] = field(default_factory=list)  # shell lines run first on every node
    env: list[str] = field(default_factory=list)  # KEY=VALUE for every process (NCCL hints ...)
    python: str = ""  # Python on the nodes ("" = the one that submits; shared filesystem)


@dataclass
class EvalConfig:
    interval: int = 50  # learner steps between held-out evaluations (also at the first and last)
    # Held-out reverse KL: exact over the whole vocabulary up to this size (the teacher returns
    # every log-prob); above it, unbiased k1/k3 estimates from the sampled tokens' log-probs.
    exact_kl_max_vocab: int = 4096


@dataclass
class LoggingConfig:
    progress: bool = True
    tensorboard: bool = True


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    env: EnvConfig = field(default_factory=EnvConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: MoEModelSpec = field(default_factory=MoEModelSpec)  # the student
    init: InitConfig = field(default_factory=InitConfig)  # real checkpoints ("" = prepared)
    prepare: PrepareConfig = field(default_factory=PrepareConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    async_: AsyncConfig = field(default_factory=AsyncConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)  # bf16 / FP8 (GPU)
    train: TrainConfig = field(default_factory=TrainConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    correction: CorrectionConfig = field(default_factory=CorrectionConfig)
    weight_sync: WeightSyncConfig = field(default_factory=WeightSyncConfig)
    transport: TransportConfig = field(default_factory=TransportConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    slurm: SlurmConfig = field(default_factory=SlurmConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


# YAML spells the section `async`, a Python keyword.
_YAML_NAMES = {"async_": "async"}


# ---------------------------------------------------------------- what every field may hold
# Every field of the tree has a rule (tests/test_config_rules.py walks the tree and tries a bad
# value for each, so a new field without one fails there). Rules are keyed by the section's
# class and field, so a model spec is checked wherever it appears (model, prepare.teacher_model,
# teacher.model). `Literal` and `bool` fields: their type is the rule (checked when built).
# Numbers: a range, checked before anything else in `validate` (the message names the key);
# rules between fields (train.min_lr <= train.lr, ...) stay in `validate`. A value is one range
# (">= 0", "> 0", "[0, 1)", ...) or alternatives joined by " or " ("0 or > 1"); an optional note
# says what a special value means. Float fields must also be finite. A list of numbers: each item.
RANGES: dict[str, str | tuple[str, str]] = {
    "RunConfig.seed": ("[0, 4294967295]", "a numpy / torch seed"),
    "EnvConfig.num_eval_prompts": ">= 1",
    "DigitsConfig.min_digits": ">= 1",
    "DigitsConfig.max_digits": ">= 1",
    "DigitsConfig.num_digits_symbols": "[2, 10]",
    "EnvConfig.max_turns": ">= 1",
    "EnvConfig.max_response_tokens": ">= 1",
    "CalculatorConfig.min_operands": ">= 1",
    "CalculatorConfig.max_operands": ">= 1",
    "CalculatorConfig.max_operand": ">= 1",
    "CalculatorConfig.tool_timeout_s": "> 0",
    "CalculatorConfig.tool_memory_mb": ">= 64",
    "DataConfig.max_prompt_tokens": ">= 1",
    "DataConfig.epochs": (">= 0", "0: endless"),
    **{f"MoEModelSpec.{k}": ">= 1" for k in (
        "vocab_size", "hidden_size", "num_layers", "num_attention_heads", "num_kv_heads",
        "head_dim", "moe_ffn_hidden_size", "num_experts", "moe_router_topk",
        "max_position_embeddings", "make_vocab_size_divisible_by")},
    "MoEModelSpec.rope_theta": "> 0",
    "MoEModelSpec.rms_norm_eps": "(0, 1)",
    "MoEModelSpec.bos_token_id": (">= 0", "a token id"),
    "MoEModelSpec.eos_token_id": (">= 0", "a token id"),
    "MoEModelSpec.pad_token_id": (">= 0", "a token id"),
    "MoEModelSpec.router_aux_loss_coeff": (">= 0", "0: no load-balancing loss"),
    "MoEModelSpec.shared_expert_ffn_hidden_size": (">= 0", "0: no shared expert"),
    "PrepareConfig.teacher_steps": ">= 1",
    "PrepareConfig.student_steps": ">= 0",
    "PrepareConfig.batch_size": ">= 1",
    "PrepareConfig.lr": "> 0",
    "PrepareConfig.teacher_label_smoothing": "[0, 1)",
    "ServerConfig.start_timeout_s": "> 0",
    "ServerConfig.request_timeout_s": "> 0",
    "ServerConfig.max_total_tokens": ">= 256",
    "ServerConfig.threads": (">= 0", "0: SGLang's default"),
    "ServerConfig.max_restarts": (">= 0", "0: a server death stops the run"),
    "RolloutConfig.temperature": "> 0",
    "RolloutConfig.top_p": ("(0, 1]", "null: by objective"),
    "RolloutConfig.max_new_tokens": ">= 1",
    "RolloutConfig.prompts_per_request": ">= 1",
    "RolloutConfig.max_inflight_requests": ">= 1",
    "RolloutConfig.group_size": ">= 1",
    "TeacherConfig.top_k": (">= 0", "0: the sampled token only"),
    "TeacherConfig.temperature": "> 0",
    "TeacherConfig.offline_samples": ">= 1",
    "TeacherConfig.self_refresh": (">= 1", "1: every published version"),
    "NamedTeacherConfig.num_servers": ">= 1",
    "AsyncConfig.max_staleness": ">= 0",
    "AsyncConfig.publish_lag": ">= 0",
    **{f"ParallelConfig.{k}": ">= 1" for k in (
        "world_size", "tensor_parallel", "pipeline_parallel", "virtual_pipeline_parallel",
        "expert_parallel", "expert_tensor_parallel", "context_parallel", "micro_batch_size")},
    "PrecisionConfig.fp8_margin": ">= 0",
    "PrecisionConfig.fp8_amax_history_len": ">= 1",
    "TrainConfig.steps": ">= 1",
    "TrainConfig.batch_size": ">= 1",
    "TrainConfig.lr": "> 0",
    "TrainConfig.weight_decay": ">= 0",
    "TrainConfig.adam_beta1": "[0, 1)",
    "TrainConfig.adam_beta2": "[0, 1)",
    "TrainConfig.grad_clip": (">= 0", "0: no clipping"),
    "TrainConfig.warmup_steps": ">= 0",
    "TrainConfig.min_lr": ">= 0",
    "TrainConfig.checkpoint_interval": (">= 0", "0: final only"),
    "TrainConfig.keep_checkpoints": ">= 1",
    "ObjectiveConfig.weights": ">= 0",
    "ObjectiveConfig.kl_coef": "> 0",
    "ObjectiveConfig.discount": "[0, 1]",
    "ObjectiveConfig.clip_eps_low": "[0, 1)",
    "ObjectiveConfig.clip_eps_high": ">= 0",
    "LSMConfig.log_ratio_clamp": (">= 0", "0: off"),
    "AOPDConfig.tau": ("(-1, 1)", "a probability gap"),
    "TokenSelectionConfig.keep_ratio": "(0, 1]",
    "CorrectionConfig.discrepancy_c": ("> 1", "the band [1/c, c]"),
    "CorrectionConfig.catastrophic_ratio": ("[0, 1)", "0: off"),
    "CorrectionConfig.dual_clip": ("0 or > 1", "0: off"),
    "CorrectionConfig.interrupt_timeout_s": "> 0",
    "CorrectionConfig.ewma_beta": ("[0, 1)", "0: from the window"),
    "CorrectionConfig.ewma_reset_tau": ("[0, 1]", "0: never"),
    "CorrectionConfig.ewma_reset_cooldown": (">= 0", "steps; 0: none"),
    "CorrectionConfig.freshness_alpha": ">= 0",
    "CorrectionConfig.freshness_beta": ">= 0",
    "CorrectionConfig.freshness_min": "[0, 1]",
    "CorrectionConfig.drift_budget": (">= 0", "0: off"),
    "WeightSyncConfig.bucket_mb": "> 0",
    "RolloutConfig.num_servers": ">= 1",
    "ServerConfig.health_timeout_s": (">= 0", "0: no health check"),
    "TeacherConfig.num_servers": ">= 1",
    "TransportConfig.credit": ">= 1",
    "TransportConfig.resend_after_s": "> 0",
    "TransportConfig.max_unacked": (">= 0", "0: unbounded"),
    "ClusterConfig.gpus_per_node": (">= 0", "0: CPU nodes"),
    "ClusterConfig.gpu_memory_gib": "> 0",
    "ClusterConfig.learner_nodes": ">= 1",
    "FleetConfig.nodes": ">= 1",
    "FleetConfig.gpus_per_server": ">= 1",
    "SlurmConfig.cpus_per_node": (">= 0", "0: Slurm's default"),
    "SlurmConfig.preempt_signal_s": (">= 0", "0: no warning signal"),
    "SlurmConfig.max_requeues": ">= 0",
    "EvalConfig.interval": ">= 1",
    "EvalConfig.exact_kl_max_vocab": (">= 0", "0: never exact"),
}


@dataclass(frozen=True)
class PathRule:
    """A path field. `empty`: what "" means (None: "" is refused when the config loads).
    `kind`: "input" (must exist when given), "output" (a directory the run writes: not an
    existing non-directory, and its nearest existing ancestor a writable directory), "node" (an
    input on the cluster's nodes: checked by `submit`, which sees the shared filesystem). What
    exists is checked on the machine that runs (`launch.checks.check_paths`, part of `preflight`),
    not when the config loads: `plan` and `submit --dry-run` work from anywhere."""
    kind: Literal["input", "output", "node"]
    empty: str | None


PATHS: dict[str, PathRule] = {
    "RunConfig.dir": PathRule("output", None),
    "RunConfig.cache_dir": PathRule("output", None),
    "DataConfig.train": PathRule("input", "no prompt file (the chat environment needs one)"),
    "DataConfig.eval": PathRule("input", "held out from data.train"),
    "InitConfig.student": PathRule("input", "made by `megatron-opd prepare`"),
    "InitConfig.teacher": PathRule("input", "made by `megatron-opd prepare`"),
    "NamedTeacherConfig.init": PathRule("input", "the run's teacher (init.teacher)"),
    "TeacherConfig.offline_store": PathRule("output", "under run.cache_dir"),
    "TransportConfig.secret_file": PathRule("input", "one made for the run"),
    "SlurmConfig.python": PathRule("node", "the Python that submits"),
}

# Text fields (and lists of text) that are not paths: "nonempty" ("" is refused) or "checked"
# (a made-up word is refused: a choice, a known name, a syntax), each where `validate` (or the
# section's own validate) says. FREE: the fields that take any value, and why.
TEXT: dict[str, Literal["nonempty", "checked"]] = {
    "RunConfig.name": "nonempty",
    "DigitsConfig.ops": "checked",
    "CalculatorConfig.call_start": "nonempty",
    "CalculatorConfig.call_end": "nonempty",
    "CalculatorConfig.observation": "checked",
    "DataConfig.prompt_key": "nonempty",
    "DataConfig.label_key": "nonempty",
    "MoEModelSpec.family": "checked",
    "MoEModelSpec.router_score_function": "checked",
    "TeacherConfig.revision": "nonempty",
    "TeacherConfig.route_column": "checked",
    "TeacherConfig.default": "checked",
    "TeacherConfig.privileged_template": "checked",
    "TeacherConfig.hint_key": "nonempty",
    "NamedTeacherConfig.name": "nonempty",
    "NamedTeacherConfig.revision": "nonempty",
    "NamedTeacherConfig.routes": "nonempty",
    "ObjectiveConfig.terms": "checked",
    "ObjectiveConfig.name": "checked",
    "ObjectiveConfig.masked_tokens": "nonempty",
    "SlurmConfig.time_limit": "nonempty",
    "SlurmConfig.extra_sbatch": "checked",
    "SlurmConfig.env": "checked",
}
FREE: dict[str, str] = {
    "SlurmConfig.partition": "passed to sbatch as it is (\"\": Slurm's default); Slurm checks it",
    "SlurmConfig.account": "passed to sbatch as it is (\"\": Slurm's default); Slurm checks it",
    "SlurmConfig.qos": "passed to sbatch as it is (\"\": Slurm's default); Slurm checks it",
    "SlurmConfig.job_name": "any name (\"\": run.name); shell-quoted where it is used",
    "SlurmConfig.mem": "passed to sbatch --mem as it is (\"\": Slurm's default); Slurm checks it",
    "SlurmConfig.setup": "shell lines run first on every node: any shell is the user's to give",
}


def _parse_range(text: str) -> list[tuple[float, bool, float, bool]]:
    """Intervals (lo, lo included, hi, hi included) of a rule such as ">= 0", "(0, 1]" or
    "0 or > 1"."""
    inf = float("inf")
    out = []
    for part in text.split(" or "):
        part = part.strip()
        if part[0] in "[(":
            lo, hi = (float(x) for x in part[1:-1].split(","))
            out.append((lo, part[0] == "[", hi, part[-1] == "]"))
        elif part.startswith((">=", "<=")):
            v = float(part[2:])
            out.append((v, True, inf, False) if part[0] == ">" else (-inf, False, v, True))
        elif part[0] in "<>":
            v = float(part[1:])
            out.append((v, False, inf, False) if part[0] == ">" else (-inf, False, v, False))
        else:
            v = float(part)
            out.append((v, True, v, True))
    return out


def in_range(value: float, text: str) -> bool:
    return any((lo < value or (lo_in and lo == value)) and (value < hi or (hi_in and value == hi))
               for lo, lo_in, hi, hi_in in _parse_range(text))


def _numbers_of(tp: Any) -> type | None:
    """int / float for a numeric field (also optional, or a list of numbers), else None."""
    if tp in (int, float):
        return tp
    if typing.get_origin(tp) in (list, types.UnionType, typing.Union):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and args[0] in (int, float):
            return args[0]
    return None


def iter_fields(obj: Any, prefix: str = ""):
    """(dotted key, "Section.field", value, type) of every leaf field below `obj` (sections set
    to null, such as an absent teacher.model, have no leaves)."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        key = f"{prefix}{_YAML_NAMES.get(f.name, f.name)}"
        if dataclasses.is_dataclass(value):
            yield from iter_fields(value, key + ".")
        elif _is_section_list(hints[f.name]):  # e.g. teacher.teachers: each item a section
            for i, item in enumerate(value):
                yield from iter_fields(item, f"{key}[{i}].")
        elif not dataclasses.is_dataclass(_section_of(hints[f.name])):
            yield key, f"{type(obj).__name__}.{f.name}", value, hints[f.name]


def _is_section_list(tp: Any) -> bool:
    """A list of sections (`list[NamedTeacherConfig]`): its items are walked like sections."""
    return typing.get_origin(tp) is list and dataclasses.is_dataclass(typing.get_args(tp)[0])


def _section_of(tp: Any) -> Any:
    """The section class of an optional section (`MoEModelSpec | None`), else `tp`."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    return args[0] if typing.get_origin(tp) in (types.UnionType, typing.Union) and len(args) == 1 \
        else tp


def check_field_rules(obj: Any, prefix: str = "") -> None:
    """Every numeric field within its range, and no "" where a path or text field refuses it,
    in this section and every section below it (the message names the dotted key)."""
    import math

    for key, name, value, tp in iter_fields(obj, prefix):
        number = _numbers_of(tp)
        if number is not None:
            rule = RANGES.get(name)
            if rule is None:  # a field added without a rule: tests/test_config_rules.py fails
                continue
            text, note = (rule, "") if isinstance(rule, str) else rule
            items = value if isinstance(value, list) else [value]
            for i, v in enumerate(items):
                k = f"{key}[{i}]" if isinstance(value, list) else key
                if v is None:
                    continue
                if number is float and not math.isfinite(v):
                    raise ConfigError(f"{k}: must be a finite number, got {v!r}")
                if not in_range(v, text):
                    shown = f"in {text}" if text[0] in "[(" else text
                    raise ConfigError(f"{k}: must be {shown}{f' ({note})' if note else ''}, "
                                      f"got {v!r}")
            continue
        path = PATHS.get(name)
        if path is not None and path.empty is None and not value.strip():
            what = "a directory" if path.kind == "output" else "a path"
            raise ConfigError(f"{key}: must not be empty, give {what}")
        if TEXT.get(name) == "nonempty" and isinstance(value, str) and not value.strip():
            raise ConfigError(f"{key}: must not be empty")


# ---------------------------------------------------------------- building from plain data
def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping (section), got {value!r}")
        return _build(tp, value, key)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{key}: must be one of {list(choices)}, got {value!r}")
        return value
    if origin in (types.UnionType, typing.Union):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{key}: invalid value {value!r}")
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "3e-3" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported config type {_type_name(tp)}")


def _build(cls: type, data: dict, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {_YAML_NAMES.get(f.name, f.name): f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for yaml_key, value in data.items():
        key = f"{prefix}.{yaml_key}" if prefix else str(yaml_key)
        if yaml_key not in names:
            known = ", ".join(sorted(names))
            raise ConfigError(f"{key}: unknown key (known keys here: {known})")
        kwargs[names[yaml_key]] = _coerce(value, hints[names[yaml_key]], key)
    return cls(**kwargs)


def to_dict(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {_YAML_NAMES.get(f.name, f.name): to_dict(getattr(obj, f.name))
                for f in dataclasses.fields(obj)}
    if isinstance(obj, list):
        return [to_dict(v) for v in obj]
    return obj


# ---------------------------------------------------------------- overrides and validation
def _one_line(e: Exception) -> str:
    """An exception's message on one line (YAML's span several, with a caret)."""
    return " ".join(str(e).replace("^", "").split())


def apply_override(data: dict, item: str) -> None:
    """Apply one `a.b.c=value` override (value parsed as YAML) to nested plain data."""
    if "=" not in item:
        raise ConfigError(f"override {item!r}: expected key=value, e.g. train.steps=20")
    dotted, raw = item.split("=", 1)
    parts = dotted.strip().split(".")
    if not all(parts):
        raise ConfigError(f"override {item!r}: empty key segment, give a dotted key such as "
                          "train.steps")
    node = data
    for part in parts[:-1]:
        name, index = part, None
        if part.endswith("]") and "[" in part:  # an item of a list of sections: teachers[1]
            name, _, index = part[:-1].partition("[")
            if not index.isdigit():
                raise ConfigError(f"{dotted}: {part}: give an item number, e.g. {name}[0]")
        node = node.setdefault(name, {} if index is None else [])
        if index is not None:
            if not isinstance(node, list) or int(index) >= len(node):
                have = len(node) if isinstance(node, list) else 0
                raise ConfigError(f"{dotted}: {name} has {have} items, no [{index}] (give the "
                                  f"whole list first, e.g. {name}=[{{...}}])")
            node = node[int(index)]
        if not isinstance(node, dict):
            raise ConfigError(f"{dotted}: {part} is not a section")
    try:
        node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"{dotted}: cannot parse value {raw!r} as YAML ({_one_line(e)}), "
                          "quote it") from None


def validate(cfg: Config, stand_in_specs: frozenset[str] = frozenset()) -> None:
    """Every section, naming the key. `stand_in_specs` ("student", "teacher"): init checkpoints
    whose architecture is only a default stand-in (their directory is not on this machine and the
    YAML does not spell the spec out, see `resolve_init_specs`): checks of their limits wait
    until the run starts where the checkpoint is."""
    def need(cond: bool, key: str, why: str) -> None:
        if not cond:
            raise ConfigError(f"{key}: {why}")

    check_field_rules(cfg)  # every field's own rule first: ranges, paths and text not empty
    specs = [(cfg.model, "model"), (cfg.prepare.teacher_model, "prepare.teacher_model")]
    if cfg.teacher.model is not None:
        specs.append((cfg.teacher.model, "teacher.model"))
    for spec, prefix in specs:
        try:
            spec.validate(prefix)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    # The run's teacher is teacher.model when given, else the prepared quickstart teacher; its
    # log-probs are compared token by token with the student's, so the vocabularies must agree.
    teacher_key = "prepare.teacher_model" if cfg.teacher.model is None else "teacher.model"
    need(run_teacher_spec(cfg).vocab_size == cfg.model.vocab_size, f"{teacher_key}.vocab_size",
         f"must equal model.vocab_size = {cfg.model.vocab_size} (one tokenizer)")
    need(cfg.teacher.model is None or bool(cfg.init.teacher.strip()), "init.teacher",
         "must name the teacher checkpoint (a Hugging Face directory) when teacher.model is set "
         "(`megatron-opd prepare` only makes prepare.teacher_model)")
    if cfg.teacher.model is not None:  # SGLang serves the teacher from its HF checkpoint
        try:
            check_hf_expressible(cfg.teacher.model, "teacher.model")
        except ValueError as e:
            raise ConfigError(str(e)) from None
        need("teacher" in stand_in_specs or cfg.teacher.model.max_position_embeddings
             >= env_max_prompt_tokens(cfg) + cfg.rollout.max_new_tokens,
             "teacher.model.max_position_embeddings", "too small for prompt + max_new_tokens "
             "(the teacher scores whole sequences)")
    validate_env(cfg, need)
    r = cfg.rollout
    need(cfg.train.batch_size % r.group_size == 0, "rollout.group_size",
         f"must divide train.batch_size = {cfg.train.batch_size} (a group never straddles a batch)")
    window = (cfg.async_.max_staleness + 1) * cfg.train.batch_size
    need(r.prompts_per_request * r.group_size <= window,
         "rollout.prompts_per_request",
         f"x rollout.group_size must be <= (async.max_staleness + 1) x train.batch_size = {window} "
         "(a request larger than the staleness window is never admitted)")
    validate_teachers(cfg, need)
    validate_teacher_signal(cfg, need)
    validate_self_teacher(cfg, need)
    need(cfg.teacher.mode == "live" or cfg.train.routing_replay == "none", "teacher.mode",
         "offline needs train.routing_replay=none (stored data carries no routing of the "
         "trained policy)")
    need(0 <= cfg.async_.publish_lag <= cfg.async_.max_staleness, "async.publish_lag",
         f"must be in [0, async.max_staleness = {cfg.async_.max_staleness}] (weights older than "
         "the bound make every sample too stale to train)")
    validate_correction(cfg, need)
    validate_parallel(cfg.parallel, cfg.model)
    try:
        cfg.precision.validate("precision")
    except ValueError as e:
        raise ConfigError(str(e)) from None
    tr = cfg.train
    need(0 <= tr.min_lr <= tr.lr, "train.min_lr", "must be in [0, train.lr]")
    p = cfg.parallel
    dense = p.tensor_parallel * p.context_parallel * p.pipeline_parallel
    need(p.world_size % dense == 0, "parallel.world_size",
         f"must be a multiple of tensor_parallel x context_parallel x pipeline_parallel = {dense}")
    experts = p.expert_tensor_parallel * p.expert_parallel * p.pipeline_parallel
    need(p.world_size % experts == 0, "parallel.world_size",
         f"must be a multiple of expert_tensor_parallel x expert_parallel x pipeline_parallel "
         f"= {experts}")
    per_step = p.micro_batch_size * max(1, p.world_size // dense)
    need(tr.batch_size % per_step == 0, "train.batch_size",
         f"must be a multiple of parallel.micro_batch_size x data-parallel size = {per_step}")
    validate_objective(cfg)
    if r.top_p is None:  # after validate_objective: objective.name is resolved into terms
        r.top_p = 0.9 if "lsm" in cfg.objective.terms else 1.0
    validate_cluster_section(cfg.cluster)
    validate_slurm_section(cfg.slurm)
    need("student" in stand_in_specs
         or cfg.model.max_position_embeddings >= env_max_prompt_tokens(cfg) + r.max_new_tokens,
         "model.max_position_embeddings", "too small for the longest prompt + max_new_tokens "
         "(lower data.max_prompt_tokens or rollout.max_new_tokens)")


def validate_env(cfg: Config, need) -> None:
    """The environment's own section, checked by the environment (megatron_opd/envs/)."""
    from megatron_opd.envs import validate_env_config

    validate_env_config(cfg, need)


def env_max_prompt_tokens(cfg: Config) -> int:
    """The longest prompt the environment can produce (memory plans, position limits)."""
    from megatron_opd.envs import max_prompt_tokens

    return max_prompt_tokens(cfg)


def validate_teachers(cfg: Config, need) -> None:
    """Several teachers (teacher.teachers) and how sequences are routed to them."""
    import re

    t = cfg.teacher
    word = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
    if not t.teachers:
        need(t.route_by == "none", "teacher.route_by",
             f"{t.route_by} routes between several teachers: list them in teacher.teachers")
        need(not t.default, "teacher.default", "names one of teacher.teachers (none listed)")
    else:
        need(t.route_by != "none", "teacher.route_by", "must be env or column to choose among "
             "teacher.teachers (none: one teacher, teacher.teachers empty)")
        need(t.mode == "live", "teacher.teachers", "several teachers score live rollouts only "
             "(teacher.mode=offline stores one teacher's scores)")
    served: dict[str, str] = {}
    for i, n in enumerate(t.teachers):
        key = f"teacher.teachers[{i}]"
        need(bool(word.fullmatch(n.name)), f"{key}.name",
             f"must be a word (letters, digits, - _ .), got {n.name!r}")
        for j, r in enumerate(n.routes):
            need(bool(r.strip()), f"{key}.routes[{j}]", "must not be empty")
        for r in n.routes or [n.name]:
            need(r not in served, f"{key}.routes", f"{r!r} is already served by teacher "
                 f"{served.get(r)!r} (a route key picks one teacher)")
            served[r] = n.name
    names = [n.name for n in t.teachers]
    for i, n in enumerate(t.teachers):
        need(names.index(n.name) == i, f"teacher.teachers[{i}].name", f"{n.name!r} is listed twice")
        need([m.revision for m in t.teachers].index(n.revision) == i,
             f"teacher.teachers[{i}].revision", f"{n.revision!r} is another teacher's revision "
             "(the revision on a sample says which teacher scored it)")
        if n.init and (Path(n.init) / "config.json").is_file():
            from megatron_opd.convert.hf_config import UnsupportedConfig, spec_from_hf_config

            try:
                spec = spec_from_hf_config(json.loads((Path(n.init) / "config.json").read_text()),
                                           where=n.init)
            except (UnsupportedConfig, KeyError, json.JSONDecodeError) as e:
                raise ConfigError(f"teacher.teachers[{i}].init: {e}") from None
            need(spec.vocab_size == cfg.model.vocab_size, f"teacher.teachers[{i}].init",
                 f"vocab_size {spec.vocab_size} must equal model.vocab_size = "
                 f"{cfg.model.vocab_size} (one tokenizer)")
    need(not t.default or t.default in names, "teacher.default",
         f"must be one of teacher.teachers' names {names}, got {t.default!r}")
    need((t.route_by == "column") == bool(t.route_column.strip()), "teacher.route_column",
         "names the dataset column to route by exactly when teacher.route_by=column")


def validate_teacher_signal(cfg: Config, need) -> None:
    """teacher.signal and teacher.top_k agree; "auto" becomes the signal top_k implies."""
    t = cfg.teacher
    if t.signal == "auto":
        t.signal = "topk" if t.top_k >= 1 else "sampled"
    need(t.signal != "sampled" or t.top_k == 0, "teacher.top_k",
         f"must be 0 with teacher.signal=sampled (got {t.top_k}); set teacher.signal=topk to "
         "send the top-K")
    need(t.signal != "topk" or t.top_k >= 1, "teacher.top_k",
         "must be >= 1 with teacher.signal=topk (32 is usual)")
    if t.signal == "hidden":
        need(t.mode == "live", "teacher.signal", "hidden states are not kept in the offline "
             "store (teacher.mode=offline): use teacher.signal=topk or sampled offline")
        need(not t.teachers, "teacher.signal", "hidden needs one teacher (the learner holds "
             "one teacher's output head): teacher.teachers must be empty")


def validate_self_teacher(cfg: Config, need) -> None:
    """teacher.source=self and teacher.prompt=privileged (docs/teachers.md)."""
    import re

    t = cfg.teacher
    fields = set(re.findall(r"{([^{}]*)}", t.privileged_template))
    need("hint" in fields and fields <= {"prompt", "hint"}, "teacher.privileged_template",
         f"must contain {{hint}} and no other field than {{prompt}} (got {sorted(fields)})")
    if t.source == "self":
        need(not t.teachers, "teacher.source", "self is the one teacher: teacher.teachers must "
             "be empty")
        need(t.mode == "live", "teacher.source", "self scores live rollouts with the learner's "
             "weights (teacher.mode=offline stores scores of a fixed teacher)")
        need(t.signal != "hidden", "teacher.signal", "hidden needs a fixed teacher output head; "
             "with teacher.source=self use sampled or topk")
        need(cfg.teacher.model is None, "teacher.model", "must be unset with teacher.source=self "
             "(the teacher is the student: model)")
    if t.prompt == "privileged":
        from megatron_opd.envs.privileged import validate_privileged

        need(t.mode == "live", "teacher.prompt", "privileged needs live scoring "
             "(teacher.mode=offline)")
        validate_privileged(cfg, need)  # the environment must have hints


def run_teacher_spec(cfg: Config) -> MoEModelSpec:
    """The teacher's architecture: `teacher.model`, or the prepared `prepare.teacher_model`."""
    return cfg.teacher.model if cfg.teacher.model is not None else cfg.prepare.teacher_model


def validate_cluster_section(c: ClusterConfig) -> None:
    """The cluster section alone (its fit to the layout is `validate_cluster_fit`)."""
    def need(cond: bool, key: str, why: str) -> None:
        if not cond:
            raise ConfigError(f"cluster.{key}: {why}")

    need(c.gpus_per_node >= 0, "gpus_per_node", "must be >= 0 (0: CPU nodes)")
    need(c.gpu_memory_gib > 0, "gpu_memory_gib", "must be positive")
    need(c.learner_nodes >= 1, "learner_nodes", "must be >= 1")
    for name in ("rollout", "teacher"):
        f = getattr(c, name)
        need(f.nodes >= 1, f"{name}.nodes", "must be >= 1")
        need(f.gpus_per_server >= 1, f"{name}.gpus_per_server", "must be >= 1")
        need(c.gpus_per_node == 0 or c.gpus_per_node % f.gpus_per_server == 0,
             f"{name}.gpus_per_server", f"must divide cluster.gpus_per_node = {c.gpus_per_node}")


def validate_cluster_fit(cfg: Config) -> None:
    """The learner's layout fills its nodes exactly (checked when a Slurm job is made or a run is
    planned; the embedded launcher runs `parallel.world_size` processes on one machine)."""
    c, world = cfg.cluster, cfg.parallel.world_size
    if c.gpus_per_node:
        if world != c.learner_nodes * c.gpus_per_node:
            raise ConfigError(f"parallel.world_size: must equal cluster.learner_nodes x "
                              f"cluster.gpus_per_node = {c.learner_nodes} x {c.gpus_per_node} = "
                              f"{c.learner_nodes * c.gpus_per_node}, got {world}")
    elif world % c.learner_nodes:
        raise ConfigError(f"parallel.world_size: must be a multiple of cluster.learner_nodes = "
                          f"{c.learner_nodes} (ranks per node are equal), got {world}")
    for role in ("rollout", "teacher"):  # a Slurm job fills its fleets' nodes (docs/slurm.md)
        f, wanted = getattr(c, role), getattr(cfg, role).num_servers
        filled = f.nodes * (c.gpus_per_node // f.gpus_per_server if c.gpus_per_node else 1)
        if role == "teacher" and cfg.teacher.teachers:
            validate_teacher_slots(cfg, filled)
        elif wanted not in (1, filled):
            raise ConfigError(f"{role}.num_servers: the Slurm job runs {filled} {role} server(s) "
                              f"(cluster.{role}); set it to {filled}, or 1 to fill the nodes")


def validate_teacher_slots(cfg: Config, slots: int) -> None:
    """Several teachers in a Slurm job take its `slots` teacher servers in config order
    (launch/fleet.py): their num_servers must fill them exactly (a slot left over would hold
    GPUs no teacher uses)."""
    total = sum(n.num_servers for n in cfg.teacher.teachers)
    if total != slots:
        raise ConfigError(f"teacher.teachers: the Slurm job runs {slots} teacher server(s) "
                          f"(cluster.teacher.nodes x cluster.gpus_per_node / "
                          f"cluster.teacher.gpus_per_server, one per node without GPUs), but "
                          f"the teachers' num_servers add up to {total}; make them add up to "
                          f"{slots}")


def validate_slurm_section(s: SlurmConfig) -> None:
    def need(cond: bool, key: str, why: str) -> None:
        if not cond:
            raise ConfigError(f"slurm.{key}: {why}")

    need(s.preempt_signal_s >= 0, "preempt_signal_s", "must be >= 0 (0: no warning signal)")
    need(s.max_requeues >= 0, "max_requeues", "must be >= 0")
    need(s.cpus_per_node >= 0, "cpus_per_node", "must be >= 0")
    need(bool(s.time_limit.strip()), "time_limit", "must not be empty (e.g. 24:00:00)")
    for i, line in enumerate(s.extra_sbatch):
        need(line.startswith("-"), f"extra_sbatch[{i}]",
             f"must be an sbatch option starting with '-', got {line!r}")
    for i, kv in enumerate(s.env):
        name = kv.split("=", 1)[0]
        need("=" in kv and name.isidentifier(), f"env[{i}]", f"must be KEY=VALUE, got {kv!r}")


def validate_correction(cfg: Config, need) -> None:
    c = cfg.correction
    need(c.proximal != "interrupt" or cfg.train.routing_replay != "r3", "correction.proximal",
         "interrupt does not carry routed experts of partial rollouts yet (train.routing_replay="
         "r3): use snapshot (exact) or ewma (cheap) with R3")
    need(c.discrepancy_c > 1, "correction.discrepancy_c", "must be > 1 (the band [1/c, c])")
    need(c.discrepancy != "none" or c.proximal not in ("ewma", "loglinear", "linear"),
         "correction.discrepancy", f"none ignores r_d = pi_prox / mu, which under proximal="
         f"{c.proximal} carries the staleness between a token's version and the proximal policy "
         "(the decoupled loss is biased without it; EWMA diverged at staleness 8 in the fidelity "
         "study): use tis, mis or icepop")
    need(0 <= c.catastrophic_ratio < 1, "correction.catastrophic_ratio", "must be in [0, 1) (0: off)")
    need(c.dual_clip == 0 or c.dual_clip > 1, "correction.dual_clip", "must be 0 (off) or > 1")
    need(0 <= c.ewma_beta < 1, "correction.ewma_beta", "must be in [0, 1) (0: from the window)")
    need(0 <= c.ewma_reset_tau <= 1, "correction.ewma_reset_tau", "must be in [0, 1] (0: never)")
    need(c.freshness_alpha >= 0, "correction.freshness_alpha", "must be >= 0")
    need(c.freshness_beta >= 0, "correction.freshness_beta", "must be >= 0")
    need(0 <= c.freshness_min <= 1, "correction.freshness_min", "must be in [0, 1]")
    need(c.drift_budget >= 0, "correction.drift_budget", "must be >= 0 (0: off)")
    need(c.proximal == "behaviour" or cfg.teacher.mode == "live", "correction.proximal",
         "offline OPD trains stored samples of the init (version 0): only behaviour applies")


def validate_objective(cfg: Config) -> None:
    """The objective's terms against each other and against what the fleets will deliver: a
    combination that cannot train is refused before anything starts."""
    from megatron_opd.objectives.names import NEEDS_TOPK, TERMS

    def need(cond: bool, key: str, why: str) -> None:
        if not cond:
            raise ConfigError(f"objective.{key}: {why}")

    o = cfg.objective
    if o.name:  # the shorthand resolves into terms; the saved config shows the terms
        need(o.name in TERMS, "name", f"unknown term {o.name!r}; known: {list(TERMS)}")
        need(o.terms in (["sampled_token_opd"], [o.name]), "name",
             f"give either name or terms, not both (name={o.name!r}, terms={o.terms})")
        o.terms, o.name = [o.name], ""
    need(len(o.terms) > 0, "terms", f"needs at least one term; known: {list(TERMS)}")
    for i, t in enumerate(o.terms):
        need(t in TERMS, f"terms[{i}]", f"unknown term {t!r}; known: {list(TERMS)}")
    need(len(set(o.terms)) == len(o.terms), "terms", "has duplicates")
    need(not o.weights or len(o.weights) == len(o.terms), "weights",
         f"needs one weight per term ({len(o.terms)}), or none")
    need(all(w >= 0 for w in o.weights) and (not o.weights or sum(o.weights) > 0), "weights",
         "must be >= 0 with a positive sum")
    k = cfg.teacher.top_k
    # teacher.signal=hidden: lsm, aopd and vopd use the teacher's whole distribution (from its
    # hidden states) instead of its top-K (docs/teacher-signals.md)
    hidden = cfg.teacher.signal == "hidden"
    for t in o.terms:
        need(t not in NEEDS_TOPK or k >= 1 or hidden, "terms",
             f"{t} needs the teacher's top-K log-probs: set teacher.top_k >= 1 (32 is usual) "
             "or teacher.signal=hidden")
    need(not hidden or "lsm" not in o.terms or o.lsm.log_ratio_clamp == 0, "lsm.log_ratio_clamp",
         "must be 0 with teacher.signal=hidden (the full-vocabulary LSM is the exact reverse KL, "
         "unclamped)")
    if "vopd" in o.terms and not hidden:
        if o.vopd.support == "topk":
            need(k >= 1, "vopd.support", "topk needs teacher.top_k >= 1")
        else:
            need(k == cfg.model.vocab_size, "vopd.support",
                 f"full needs the teacher's whole distribution: teacher.top_k = model.vocab_size "
                 f"= {cfg.model.vocab_size}, got {k} (or use vopd.support=topk)")
    sel = o.token_selection
    need(0 < sel.keep_ratio <= 1, "token_selection.keep_ratio", "must be in (0, 1]")
    need(sel.method != "tip" or sel.divergence != "topk" or k >= 1, "token_selection.divergence",
         "topk needs teacher.top_k >= 1")
    need(o.lsm.log_ratio_clamp >= 0, "lsm.log_ratio_clamp", "must be >= 0 (0: off)")
    need(o.aopd.tau > -1 and o.aopd.tau < 1, "aopd.tau", "must be in (-1, 1) (a probability gap)")
    group = cfg.rollout.group_size
    need("grpo_opd" not in o.terms or group >= 2, "terms",
         f"grpo_opd needs groups of samples per prompt: set rollout.group_size >= 2 (got {group})")
    mode = cfg.teacher.mode
    need("offline_opd" not in o.terms or mode == "offline", "terms",
         "offline_opd trains on precomputed teacher log-probs: set teacher.mode=offline")
    for i, tok in enumerate(o.masked_tokens):
        need(bool(tok), f"masked_tokens[{i}]", "empty token")


def validate_parallel(p: ParallelConfig, spec: MoEModelSpec, prefix: str = "parallel") -> None:
    """What the layout must satisfy for this model, independent of the world size."""
    def need(cond: bool, key: str, why: str) -> None:
        if not cond:
            raise ConfigError(f"{prefix}.{key}: {why}")

    for key in ("tensor_parallel", "pipeline_parallel", "virtual_pipeline_parallel",
                "expert_parallel", "expert_tensor_parallel", "context_parallel", "micro_batch_size"):
        need(getattr(p, key) >= 1, key, "must be >= 1")
    tp, etp = p.tensor_parallel, p.expert_tensor_parallel
    need(spec.num_attention_heads % tp == 0, "tensor_parallel",
         f"must divide model.num_attention_heads = {spec.num_attention_heads}")
    need(spec.num_kv_heads % tp == 0, "tensor_parallel",
         f"must divide model.num_kv_heads = {spec.num_kv_heads} (each rank holds whole KV groups)")
    # no vocab_size % tp check: megatron pads the vocabulary (models.spec.padded_vocab_size)
    need(spec.num_experts % p.expert_parallel == 0, "expert_parallel",
         f"must divide model.num_experts = {spec.num_experts}")
    need(spec.moe_ffn_hidden_size % etp == 0, "expert_tensor_parallel",
         f"must divide model.moe_ffn_hidden_size = {spec.moe_ffn_hidden_size}")
    need(etp in (1, tp), "expert_tensor_parallel",
         f"must be 1 or tensor_parallel = {tp} (the layouts megatron-opd tests)")
    # megatron-core 0.16.1 treats experts as dense parameters when EP = 1 and reduces their
    # gradients over the dense data-parallel group only; with ETP < TP each TP rank holds whole
    # experts fed by its own sequence shard, so those partial gradients would never be summed.
    need(p.expert_parallel > 1 or etp == tp, "expert_tensor_parallel",
         f"must equal tensor_parallel = {tp} when expert_parallel = 1 (megatron reduces expert "
         f"gradients like dense ones then)")
    need(tp == 1 or p.sequence_parallel, "sequence_parallel",
         "must be true when tensor_parallel > 1 (megatron requires it for MoE layers)")
    stages = p.pipeline_parallel * p.virtual_pipeline_parallel
    need(spec.num_layers % stages == 0, "pipeline_parallel",
         f"pipeline_parallel x virtual_pipeline_parallel = {stages} must divide "
         f"model.num_layers = {spec.num_layers}")
    need(p.virtual_pipeline_parallel == 1 or p.pipeline_parallel > 1, "virtual_pipeline_parallel",
         "needs pipeline_parallel > 1")
    need(p.context_parallel == 1, "context_parallel",
         "> 1 needs Transformer Engine attention, which megatron-opd does not build yet")


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """Read YAML (or start from defaults), apply overrides, build typed config, validate."""
    data: dict = {}
    if path is not None:
        example = "e.g. configs/quickstart.yaml"
        try:
            loaded = yaml.safe_load(Path(path).read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}, give a YAML config ({example})") \
                from None
        except IsADirectoryError:
            raise ConfigError(f"--config: {path} is a directory, give a YAML config file in it "
                              f"({example})") from None
        except (OSError, UnicodeDecodeError) as e:
            why = e.strerror if isinstance(e, OSError) and e.strerror else "not a text file"
            raise ConfigError(f"--config: cannot read {path} ({why}), give a readable YAML "
                              f"config ({example})") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML ({_one_line(e)}), fix the file") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: top level must be a mapping of sections")
        data = loaded or {}
    for item in overrides:
        apply_override(data, item)
    cfg = _build(Config, data)
    validate(cfg, resolve_init_specs(cfg, data))
    return cfg


def resolve_init_specs(cfg: Config, data: dict) -> frozenset[str]:
    """A checkpoint named by `init.student` / `init.teacher` that is readable here defines its
    architecture: `model` / `teacher.model` become what its config.json says. Keys the YAML
    spells out must agree with it (a mismatch names the key). A directory that is not here
    (it lives on the cluster's filesystem) leaves the YAML's spec as it is: `plan` and
    `submit --dry-run` work from anywhere, `train` refuses a missing directory. Returns the
    roles whose spec is then only a default stand-in (no directory here, no spec in the YAML)."""
    from megatron_opd.convert.hf_config import UnsupportedConfig, spec_from_hf_config

    stand_ins = set()
    for init_key, spec_key, given in (
            ("student", "model", data.get("model") or {}),
            ("teacher", "teacher.model", (data.get("teacher") or {}).get("model") or {})):
        path = Path(getattr(cfg.init, init_key) or "") / "config.json"
        if not getattr(cfg.init, init_key):
            continue
        if not path.is_file():
            if not given:
                stand_ins.add(init_key)
            continue
        try:  # json, not yaml: YAML 1.1 reads JSON's 1e-06 as a string
            hf = spec_from_hf_config(json.loads(path.read_text()), where=str(path))
        except (UnsupportedConfig, KeyError, json.JSONDecodeError) as e:
            raise ConfigError(f"init.{init_key}: {e}") from None
        for key, value in given.items():
            if hasattr(hf, key) and getattr(hf, key) != _coerce(
                    value, typing.get_type_hints(MoEModelSpec)[key], f"{spec_key}.{key}"):
                raise ConfigError(f"{spec_key}.{key}: {value!r} but init.{init_key} = "
                                  f"{path.parent} has {getattr(hf, key)!r} (its config.json "
                                  f"defines the model; drop the key or fix it)")
        if init_key == "student":
            cfg.model = hf
        else:
            cfg.teacher.model = hf
    return frozenset(stand_ins)


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def config_from_dict(data: dict) -> Config:
    cfg = _build(Config, data)
    validate(cfg, resolve_init_specs(cfg, data))
    return cfg
