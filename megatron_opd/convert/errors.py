"""Bad checkpoint files, named: one exception for input the user must fix (the CLI prints it as
`megatron-opd: error: <what>, <fix>` and exits 2), and safetensors opening that names the file
instead of the library's bare "incomplete metadata" traceback."""

from __future__ import annotations

from pathlib import Path


class BadCheckpoint(ValueError):
    """Input files that cannot be used as they are; the message says which file and what to do."""


def open_safetensors(path: str | Path):
    """`safe_open` of one file, or BadCheckpoint naming it (truncated downloads fail here: the
    header promises more bytes than the file has)."""
    from safetensors import SafetensorError, safe_open

    try:
        return safe_open(str(path), framework="pt")
    except SafetensorError as e:
        raise BadCheckpoint(f"{path}: not a complete safetensors file ({e}), re-download or "
                            f"re-export it") from None


def load_safetensors(path: str | Path) -> dict:
    """Every tensor of one safetensors file (`safetensors.torch.load_file`), or BadCheckpoint."""
    with open_safetensors(path) as f:
        return {k: f.get_tensor(k) for k in f.keys()}
