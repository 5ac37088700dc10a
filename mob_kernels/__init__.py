"""mob_kernels: fast, exact, batched visual-token selection for multimodal LLMs.

    import mob_kernels
    keep = mob_kernels.select(vis, prompt, k_p=32, k=64)     # MoB; also torch.ops.mob.select(vis, prompt, 32, 64)
    keep = mob_kernels.divprune(vis, 64)                     # DivPrune
    keep = mob_kernels.cdpruner(vis, relevance, 64)          # CDPruner
    keep, role = mob_kernels.d2pruner(vis, importance, 64)   # D2Pruner
    keep = mob_kernels.btp_stage(hidden, attention, 288, mode="union", ...)   # one BTP stage

docs/contract.md is the contract; ``mob_kernels.backends.reference`` with the compositions in ``mob_kernels.methods``
implements it plainly, and every backend is tested against it.
"""

from ._version import __version__
from .errors import BackendUnavailableError
from .methods import (
    btp_stage,
    cdpruner,
    cdpruner_relevance,
    d2pruner,
    divprune,
    farthest_point_sample,
    prompt_budget,
    prompt_cover,
    select,
)
from .registry import available_backends, budget_arguments, method_names, resolve_backend

__all__ = [
    "select",
    "prompt_cover",
    "farthest_point_sample",
    "divprune",
    "cdpruner",
    "cdpruner_relevance",
    "d2pruner",
    "btp_stage",
    "prompt_budget",
    "method_names",
    "budget_arguments",
    "available_backends",
    "resolve_backend",
    "BackendUnavailableError",
    "__version__",
]
