# Put on PYTHONPATH only for the SGLang server processes megatron-opd launches (and so inherited
# by the children SGLang spawns): applies the CPU compat before SGLang is imported.
from megatron_opd.compat.sglang_cpu import install_sglang_cpu_compat

install_sglang_cpu_compat()
