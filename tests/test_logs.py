"""Logs a person can read (issue 14 item 7): the known third-party warnings are filtered (and
nothing else), lifecycle lines are timestamped, the progress bar labels evaluation figures and
counts only this launch's steps. The learner log of a real run is checked in
tests/test_e2e_quickstart.py."""

import io
import json
import os
import re
import warnings

from fastapi.exceptions import FastAPIDeprecationWarning
from tqdm import tqdm

from megatron_opd.launch.runner import _update_bar
from megatron_opd.logs import KNOWN_LOG_RECORDS, KNOWN_WARNINGS, event, quiet_known_warnings

# The warnings as the pinned versions print them (megatron-core 0.16.1, torch 2.13.0, SGLang
# 0.5.23), copied from a quickstart's logs.
SEEN = [
    (UserWarning, "Transformer Engine and Apex are not installed. Falling back to Torch "
                  "optimizers."),
    (UserWarning, "Transformer Engine and Apex are not installed. Falling back to local "
                  "implementations of multi_tensor_applier and multi_tensor_scale"),
    (UserWarning, "Apex is not installed. Falling back to Torch Norm"),
    (UserWarning, "full scope is deprecated. Use empty cuda_graph_scope to capture the whole "
                  "layer."),
    (FutureWarning, "`torch.distributed.reduce_scatter_tensor` is deprecated. Please use "
                    "`torch.distributed.reduce_scatter_single` instead."),
    (FutureWarning, "`torch.distributed.all_gather_into_tensor` is deprecated. Please use "
                    "`torch.distributed.all_gather_single` instead."),
    (FutureWarning, "`load_state_dict` is deprecated and will be removed in future versions. "
                    "Please use `load` instead."),
    (FutureWarning, "Please use DTensor instead and we are deprecating ShardedTensor."),
    (UserWarning, "'python -m sglang.launch_server' is still supported, but 'sglang serve' is "
                  "the recommended entrypoint.\n  Example: sglang serve --model-path <model>"),
    (UserWarning, "Only CUDA, HIP and XPU support AWQ currently."),
    (UserWarning, "Only CUDA, MUSA and NPU support GGUF quantization currently."),
    (UserWarning, "Triton is not supported on current platform, roll back to CPU."),
    (FastAPIDeprecationWarning, "ORJSONResponse is deprecated, FastAPI now serializes data "
                                "directly to JSON bytes via Pydantic"),
]


def test_known_warnings_are_hidden_and_nothing_else():
    assert all(w.why.strip() for w in KNOWN_WARNINGS)  # each entry says why it may be hidden
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_known_warnings()
        for category, message in SEEN:
            warnings.warn(message, category)
        assert caught == [], [str(w.message) for w in caught]
        # not listed: still shown (another text, or a listed text in another category)
        warnings.warn("Transformer Engine is installed but broken", UserWarning)
        warnings.warn("Only CUDA, HIP and XPU support AWQ currently.", RuntimeWarning)
        warnings.warn("something new went wrong", UserWarning)
    assert len(caught) == 3
    for w in KNOWN_WARNINGS:  # every entry matches something seen (no dead entries)
        assert any(re.match(w.message, m, re.I) and issubclass(c, w.category) for c, m in SEEN), w


def test_known_log_record_keeps_one_line_without_its_traceback():
    import logging

    (known,) = KNOWN_LOG_RECORDS
    logger = logging.getLogger(known.logger)
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    logger.addHandler(handler)
    saved = list(logger.filters)
    try:
        quiet_known_warnings()
        quiet_known_warnings()  # once is enough: no second filter
        assert sum(type(f).__name__ == "_WithoutTraceback" for f in logger.filters) == 1
        for message in ("post-warmup freeze_gc failed", "another failure"):
            try:
                raise ConnectionRefusedError(111, "Connection refused")
            except OSError:
                logger.warning(message, exc_info=True)
    finally:
        logger.removeHandler(handler)
        logger.filters[:] = saved
    lines = stream.getvalue().splitlines()
    assert lines[0] == "post-warmup freeze_gc failed (known, harmless: megatron_opd/logs.py)"
    assert lines[1] == "another failure" and "Traceback" in lines[2]  # others keep theirs


def test_event_is_one_timestamped_line(capsys):
    event("learner", "checkpoint saved", step=10, path="/r/checkpoints/step_00000010")
    out = capsys.readouterr().out
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ \[learner\] checkpoint saved step=10 "
                        r"path=/r/checkpoints/step_00000010\n", out), out


def _record(step, version, eval_version):
    return {"step": step, "train/loss": 0.5, "eval/reverse_kl": 1.25, "eval/accuracy": 0.5,
            "eval/version": eval_version, "weights/version": version}


def _write(path, records):
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
    tmp.replace(path)  # as MetricsWriter does when a resumed learner cuts the redone steps


def test_progress_bar_labels_eval_figures_and_counts_only_this_launch(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    # the killed run logged 37 steps; its checkpoint holds 30
    _write(metrics, [_record(s, s + 1, 0 if s < 34 else 35) for s in range(37)])
    stale = (metrics.stat().st_ino, metrics.stat().st_size)
    out = io.StringIO()
    bar = tqdm(total=100, initial=30, file=out, mininterval=0)
    _update_bar(bar, metrics, stale)
    assert bar.n == 30  # the killed run's records after the checkpoint are not counted
    # the learner cut them (a new file) and trained two steps
    _write(metrics, [_record(s, s + 1, 0 if s < 20 else 20) for s in range(32)])
    _update_bar(bar, metrics, stale)
    assert bar.n == 32 and bar.initial == 30
    assert bar.format_dict["n"] - bar.format_dict["initial"] == 2  # what the rate counts
    assert bar.postfix == "loss=0.500, v=32, eval_kl@v20=1.250, eval_acc@v20=0.50"
    bar.close()
    # a fresh run: no checkpoint, nothing stale
    os.unlink(metrics)
    bar = tqdm(total=100, file=io.StringIO())
    _write(metrics, [_record(0, 1, 0)])
    _update_bar(bar, metrics)
    assert bar.n == 1 and "eval_kl@v0=1.250" in bar.postfix
