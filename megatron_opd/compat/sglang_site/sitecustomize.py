# Put on PYTHONPATH only for the SGLang server processes megatron-opd launches (and so inherited
# by the children SGLang spawns): applies the CPU compat before SGLang is imported. Import
# stand-ins go on sys.meta_path; patches of SGLang functions (the `_cuda_host_register` no-op)
# are post-import hooks that act when SGLang first imports the module, so nothing is imported here.
from megatron_opd.compat.sglang_cpu import install_sglang_cpu_compat

install_sglang_cpu_compat()
