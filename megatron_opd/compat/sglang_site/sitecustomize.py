# Put on PYTHONPATH only for the SGLang server processes megatron-opd launches (and so inherited
# by the children SGLang spawns): applies the patches before SGLang is imported. Import
# stand-ins go on sys.meta_path; patches of SGLang functions (the `_cuda_host_register` no-op)
# are post-import hooks that act when SGLang first imports the module, so nothing is imported here.
# On every device: the run patches (the scheduler's store listens on its host, a short
# server_args log line); on a CPU-only machine also the CPU compat.
# A teacher server of teacher.signal=hidden (HIDDEN_STATES_ENV set by SGLangServer) also sends
# its hidden states as binary frames.
import os

from megatron_opd.compat.sglang_cpu import (HIDDEN_STATES_ENV, install_sglang_cpu_compat,
                                            install_sglang_run_patches,
                                            patch_hidden_states_as_frames)
from megatron_opd.logs import quiet_known_warnings

quiet_known_warnings()  # the known third-party warnings (megatron_opd/logs.py says why each)
install_sglang_run_patches()
install_sglang_cpu_compat()  # a no-op where CUDA is available
if os.environ.get(HIDDEN_STATES_ENV):
    patch_hidden_states_as_frames(os.environ[HIDDEN_STATES_ENV])
