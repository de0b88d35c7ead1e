"""Checkpoint conversion: Hugging Face safetensors <-> the learner's megatron dist checkpoints
(Qwen3-MoE and Mixtral), under any learner layout, a few layers at a time.

- `hf_config`: HF config.json -> MoEModelSpec (refusing what the spec cannot express);
- `hf_io`: lazy safetensors reading (one tensor at a time) and sharded safetensors writing;
- `skeleton`: the learner's model built on the meta device, with one layer group at a time
  given real storage, and that group's part of megatron's sharded state dict;
- `dcp`: per-group dist_checkpointing saves merged into one checkpoint, partial reads;
- `convert`: the two directions; `cli`: the command line (`tools/convert_checkpoint.py`).
See docs/checkpoints.md.
"""
