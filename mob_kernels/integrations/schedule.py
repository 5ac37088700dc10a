"""BTP stage plans for the model integrations: which decoder layers prune, and each stage's arguments.

A plan is a list of stages, each a dict as in ``mob_kernels.methods.btp.SCHEDULES``: ``layer`` (1-based: the stage
prunes *before* decoder layer ``layer``, so 0-based index ``layer - 1``; it reads the attention at the layer before,
so ``layer >= 2``), ``keep`` (image tokens kept per image), ``mode`` and the ``btp_stage`` arguments ``n_div``,
``n_attn``, ``n_extra``, ``rebalance``, and optionally ``spatial_seed`` (a count: BTP's spatial seed of that many
cells on the image's first tile, ``mob_kernels.integrations.layout.spatial_seed_in_first_tile``).

Counts are ints or expressions (strings) over ``n`` (the image's tokens entering the stage), ``k`` (the stage's
resolved ``keep``), ``N`` (the image's tokens before any stage) and ``T`` (the cells of its first tile), using
``+ - * / //``, parentheses, numbers and ``int``, ``round``, ``min``, ``max``; e.g. the Qwen plan's ``"n//2"`` and
``"int(int(0.1*k)*1.2)"``. ``keep`` is clipped to ``[0, n]``.

Defaults (``default_plan``): LLaVA-1.5 runs the released LLaVA plan, its counts written for 576 tokens scaled by
``N / 576`` (exactly the released numbers at 576; other image sizes keep its proportions) and its 144-cell spatial
seed by ``T / 576``; LLaVA-NeXT, for which no plan was released, the same scaled plan (the seed on the base image);
Qwen2.5-VL the released Qwen plan; Qwen2-VL, for which none was released either, the Qwen2.5-VL plan (the same
language model family).
"""

from __future__ import annotations

import ast
import copy
from typing import Any

from mob_kernels.methods.btp import MODES, SCHEDULES

STAGE_KEYS = ("layer", "keep", "mode", "n_div", "n_attn", "n_extra", "rebalance", "spatial_seed")
COUNT_KEYS = ("n_div", "n_attn", "n_extra", "rebalance", "spatial_seed")
_LLAVA_TOKENS = 576
_FUNCS = {"int": int, "round": round, "min": min, "max": max}
_OPS = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b, ast.Mult: lambda a, b: a * b,
        ast.Div: lambda a, b: a / b, ast.FloorDiv: lambda a, b: a // b}


def evaluate(expr: Any, names: dict[str, int], what: str) -> int:
    """An int, or an expression string over ``names`` (see the module docstring), as an int."""
    if isinstance(expr, bool):
        raise TypeError(f"{what} must be an int or an expression string, got {expr!r}")
    if isinstance(expr, int):
        return expr
    if not isinstance(expr, str):
        raise TypeError(f"{what} must be an int or an expression string, got {type(expr).__name__} {expr!r}")

    def ev(node):
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value,
                                                                                                       bool):
            return node.value
        if isinstance(node, ast.Name) and node.id in names:
            return names[node.id]
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](ev(node.left), ev(node.right))
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -ev(node.operand)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _FUNCS \
                and not node.keywords:
            return _FUNCS[node.func.id](*(ev(a) for a in node.args))
        raise ValueError(f"{what}={expr!r}: only numbers, {sorted(names)}, + - * / //, parentheses and "
                         f"{sorted(_FUNCS)} are allowed")

    try:
        value = ev(ast.parse(expr, mode="eval"))
    except SyntaxError as e:
        raise ValueError(f"{what}={expr!r} is not an expression: {e.msg}") from None
    if isinstance(value, float):
        if not value.is_integer():
            raise ValueError(f"{what}={expr!r} gives {value}, not an integer; wrap it in int() or round()")
        value = int(value)
    return int(value)


def _scaled_llava() -> list[dict[str, Any]]:
    plan = []
    for stage in SCHEDULES["llava"]:
        s = dict(stage)
        for key in ("keep",) + COUNT_KEYS:
            value = s.get(key)
            if isinstance(value, int) and (key != "keep" or value > 0):
                s[key] = f"round({value}*T/{_LLAVA_TOKENS})" if key == "spatial_seed" else \
                    f"round({value}*N/{_LLAVA_TOKENS})"
        plan.append(s)
    return plan


def default_plan(model_type: str) -> list[dict[str, Any]]:
    if model_type in ("llava", "llava_next"):
        return _scaled_llava()
    return copy.deepcopy(SCHEDULES["qwen2_5_vl"])


def normalise(schedule, model_type: str, n_layers: int) -> list[dict[str, Any]]:
    """Check a plan (None: the model's default; a key of ``SCHEDULES``; or a list of stage dicts) and return it with
    each stage's 0-based ``index``."""
    if schedule is None:
        plan = default_plan(model_type)
    elif isinstance(schedule, str):
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule must be a key of SCHEDULES {sorted(SCHEDULES)} or a list of stages, got "
                             f"{schedule!r}")
        plan = _scaled_llava() if schedule == "llava" else copy.deepcopy(SCHEDULES[schedule])
    elif isinstance(schedule, (list, tuple)) and schedule and all(isinstance(s, dict) for s in schedule):
        plan = [dict(s) for s in schedule]
    else:
        raise TypeError(f"schedule must be None, a key of SCHEDULES or a non-empty list of stage dicts, got "
                        f"{schedule!r}")
    previous = 1
    for i, stage in enumerate(plan):
        unknown = set(stage) - set(STAGE_KEYS)
        if unknown:
            raise ValueError(f"schedule stage {i} has unknown keys {sorted(unknown)}; allowed: {STAGE_KEYS}")
        layer = stage.get("layer")
        if isinstance(layer, bool) or not isinstance(layer, int) or not previous < layer <= n_layers:
            raise ValueError(
                f"schedule stage {i}: layer={layer!r} must be an int in ({previous}, {n_layers}]: 1-based 'prune "
                "before decoder layer L', increasing, and >= 2 because a stage reads the attention at the layer "
                f"before (this model has {n_layers} decoder layers)")
        previous = layer
        if "keep" not in stage:
            raise ValueError(f"schedule stage {i} needs 'keep'")
        if stage["keep"] != 0 and stage.get("mode") not in MODES:
            raise ValueError(f"schedule stage {i}: mode must be one of {MODES}, got {stage.get('mode')!r}")
        for key in ("keep",) + COUNT_KEYS:  # malformed expressions fail here, not in the middle of a forward
            if key in stage:
                try:
                    evaluate(stage[key], dict(n=1, N=1, T=1, k=1), f"schedule stage {i}: {key}")
                except ZeroDivisionError:
                    pass
        stage["index"] = layer - 1
    return plan


def stage_arguments(stage: dict[str, Any], n: int, n_image: int, first_tile: int) -> dict[str, Any]:
    """The ``btp_stage`` arguments of ``stage`` for an image with ``n`` tokens entering it (``n_image`` before any
    stage, ``first_tile`` cells in its first tile): ``k`` plus the counts, all resolved."""
    names = dict(n=n, N=n_image, T=first_tile)
    k = min(max(evaluate(stage["keep"], names, "keep"), 0), n)
    names["k"] = k
    out: dict[str, Any] = {"k": k, "mode": stage.get("mode")}
    for key in COUNT_KEYS:
        if key in stage:
            out[key] = evaluate(stage[key], names, key)
    return out
