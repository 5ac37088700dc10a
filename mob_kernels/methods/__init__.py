"""The method axis: one module per selection method, each declaring its ops (schema, checks, composition over backend
primitives, fake implementation, budget rule) with ``mob_kernels.registry.register`` and its front doors.

Adding a method (docs/contract.md §4 walks through it with DivPrune and CDPruner as the examples): write its algorithm
as a function of a backend ``P`` and the batched inputs, using ``P``'s primitives and plain torch; register it; import
the module here. Run over the reference backend that function is the method's contract, and it runs on every backend
on day one; a backend may later add a fused implementation named after the method.
"""

# Registration order is the order method_names() lists them in: MoB first.
from .mob import farthest_point_sample, prompt_budget, prompt_cover, resolve_fold, select  # isort: skip
from .divprune import divprune, most_isolated  # isort: skip
from .cdpruner import cdpruner, cdpruner_relevance  # isort: skip
from .d2pruner import d2pruner  # isort: skip
from .btp import btp_stage, btp_stage_as_released, spatial_seed  # isort: skip

__all__ = [
    "select",
    "prompt_cover",
    "farthest_point_sample",
    "prompt_budget",
    "resolve_fold",
    "divprune",
    "most_isolated",
    "cdpruner",
    "cdpruner_relevance",
    "d2pruner",
    "btp_stage",
    "btp_stage_as_released",
    "spatial_seed",
]
