"""The objective's term names, importable without torch (the config validates against them)."""

TERMS = ("sampled_token_opd", "lsm", "aopd", "vopd", "grpo_opd", "offline_opd")
# Terms that read the student's logits at the teacher's top-K ids (teacher.top_k >= 1).
NEEDS_TOPK = ("lsm", "aopd")
# Terms trained with a policy-gradient ratio against pi_old.
PG_TERMS = ("sampled_token_opd", "aopd", "vopd", "grpo_opd", "offline_opd")
