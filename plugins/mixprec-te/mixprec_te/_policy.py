"""Which layers become Transformer Engine layers, and why the others stay.

Pure torch, no Transformer Engine: the rules are shared by ``wrap`` (a built
model is converted) and ``init_module`` (layers are built as TE layers), and are
tested on any machine.

The rules, in order, for each ``nn.Linear``, ``nn.LayerNorm`` and ``nn.RMSNorm``:

1. only the exact torch classes are replaced; a subclass keeps its own forward;
2. a module ``ignore_modules`` selects stays: mixprec's one rule for it,
   :func:`mixprec.utils.match_module` (a dotted name or glob selects the module
   and everything inside it);
3. a layer whose parameters are shared with another module (tied weights) or
   that is registered under two names stays (replacing it would untie them);
4. ``Linear``: in and out features must be multiples of 16 (TE asserts the
   forward GEMM's shapes; the backward GEMMs contract over ``out_features``);
   norms: a 1-D ``normalized_shape`` with affine parameters as TE keeps them.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from dataclasses import dataclass, field

import torch

from mixprec.utils import match_module, unmatched_patterns

__all__ = [
    "FP8_DIM_MULTIPLE",
    "LayerDecision",
    "LayerPlan",
    "layernorm_keep_reason",
    "linear_fits",
    "matches",
    "plan_layers",
    "rmsnorm_keep_reason",
]

#: TE's FP8 GEMMs need both matrix dimensions of a Linear weight divisible by this.
FP8_DIM_MULTIPLE = 16

_RMSNORM: type[torch.nn.Module] | None = getattr(torch.nn, "RMSNorm", None)
_KINDS: dict[type[torch.nn.Module], str] = {torch.nn.Linear: "Linear", torch.nn.LayerNorm: "LayerNorm"}
if _RMSNORM is not None:
    _KINDS[_RMSNORM] = "RMSNorm"


@dataclass(frozen=True)
class LayerDecision:
    """What happens to one torch layer.

    :ivar name: the layer's full dotted path in the model.
    :ivar kind: ``"Linear"``, ``"LayerNorm"`` or ``"RMSNorm"``.
    :ivar convert: True if it becomes the TE layer of the same kind.
    :ivar reason: why it stays (empty when converted).
    :ivar shape_kept: True if it stays only because FP8 GEMMs cannot take its shape.
    """

    name: str
    kind: str
    convert: bool
    reason: str = ""
    shape_kept: bool = False


@dataclass
class LayerPlan:
    """The decisions for a whole model.

    :ivar decisions: one per torch Linear/LayerNorm/RMSNorm (subclasses too).
    :ivar foreign_te: TE layers the model already held, not built by mixprec; when
        there are any, nothing is converted (the user placed TE layers by hand).
    :ivar revert: TE layers built by ``init_module`` that ``ignore_modules`` now excludes.
    :ivar unmatched_ignores: ``ignore_modules`` entries that matched no module.
    """

    decisions: list[LayerDecision] = field(default_factory=list)
    foreign_te: list[str] = field(default_factory=list)
    revert: list[str] = field(default_factory=list)
    unmatched_ignores: list[str] = field(default_factory=list)

    @property
    def to_convert(self) -> list[LayerDecision]:
        if self.foreign_te:
            return []
        return [d for d in self.decisions if d.convert]

    @property
    def shape_kept(self) -> list[LayerDecision]:
        return [d for d in self.decisions if d.shape_kept]


def linear_fits(in_features: int, out_features: int) -> bool:
    """True if TE's FP8 GEMMs can take a Linear of this shape."""
    return in_features % FP8_DIM_MULTIPLE == 0 and out_features % FP8_DIM_MULTIPLE == 0


def _linear_reason(in_features: int, out_features: int) -> str:
    return (f"in_features={in_features}, out_features={out_features}: FP8 GEMMs need both "
            f"divisible by {FP8_DIM_MULTIPLE}")


def layernorm_keep_reason(
    normalized_shape: Iterable[int] | int, elementwise_affine: bool, has_bias: bool
) -> str | None:
    """Why an ``nn.LayerNorm`` with these settings stays, or None if it converts."""
    shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
    if len(shape) != 1:
        return f"normalized_shape={list(shape)} is multi-dimensional; te.LayerNorm takes one dimension"
    if not elementwise_affine:
        return "elementwise_affine=False; te.LayerNorm always has a weight and a bias"
    if not has_bias:
        return "bias=False; te.LayerNorm always has a bias"
    return None


def rmsnorm_keep_reason(
    normalized_shape: Iterable[int] | int, eps: float | None, elementwise_affine: bool,
    te_has_rmsnorm: bool = True,
) -> str | None:
    """Why an ``nn.RMSNorm`` with these settings stays, or None if it converts."""
    if not te_has_rmsnorm:
        return "this Transformer Engine has no te.RMSNorm"
    shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
    if len(shape) != 1:
        return f"normalized_shape={list(shape)} is multi-dimensional; te.RMSNorm takes one dimension"
    if not elementwise_affine:
        return "elementwise_affine=False; te.RMSNorm always has a weight"
    if eps is None:
        return "eps=None follows the input dtype; te.RMSNorm needs a fixed eps"
    return None


#: The first ``ignore_modules`` pattern that selects module ``name``, or None: the name
#: this module has exported for :func:`mixprec.utils.match_module`, which it is.
matches = match_module


def _is_te(module: torch.nn.Module) -> bool:
    return type(module).__module__.split(".")[0] == "transformer_engine"


def _decide(
    name: str, module: torch.nn.Module, kind: str, *, te_has_rmsnorm: bool,
    shared: dict[int, list[str]],
) -> LayerDecision:
    base = next(cls for cls, k in _KINDS.items() if k == kind)
    if type(module) is not base:
        return LayerDecision(name, kind, False,
                             f"{type(module).__name__} subclasses nn.{kind}; its forward may differ")
    for pname, param in module.named_parameters(recurse=False):
        others = [n for n in shared.get(id(param), []) if n != f"{name}.{pname}"]
        if others:
            return LayerDecision(name, kind, False, f"{pname} is shared with {others[0]}")
    if kind == "Linear":
        lin: torch.nn.Linear = module  # type: ignore[assignment]
        if not linear_fits(lin.in_features, lin.out_features):
            return LayerDecision(name, kind, False, _linear_reason(lin.in_features, lin.out_features),
                                 shape_kept=True)
        return LayerDecision(name, kind, True)
    if kind == "LayerNorm":
        ln: torch.nn.LayerNorm = module  # type: ignore[assignment]
        reason = layernorm_keep_reason(ln.normalized_shape, ln.elementwise_affine, ln.bias is not None)
    else:
        reason = rmsnorm_keep_reason(module.normalized_shape, module.eps,  # type: ignore[arg-type]
                                     module.elementwise_affine, te_has_rmsnorm)  # type: ignore[arg-type]
    return LayerDecision(name, kind, reason is None, reason or "")


def plan_layers(
    module: torch.nn.Module, *, ignore_modules: Iterable[str] = (), te_has_rmsnorm: bool = True,
    built_by_mixprec: Collection[torch.nn.Module] = (),
) -> LayerPlan:
    """Decide, for every layer of ``module``, whether it becomes a TE layer.

    :param ignore_modules: dotted module names or globs of modules to leave alone, as
        :func:`mixprec.utils.match_module` selects them.
    :param te_has_rmsnorm: whether the installed TE provides ``te.RMSNorm``.
    :param built_by_mixprec: TE layers mixprec built (``init_module``); any other TE
        layer in the model means it was converted by hand, and nothing is converted.
    """
    patterns = list(ignore_modules)
    plan = LayerPlan()
    shared: dict[int, list[str]] = {}
    for pname, param in module.named_parameters(remove_duplicate=False):
        shared.setdefault(id(param), []).append(pname)
    seen: dict[int, str] = {}
    twice: set[int] = set()
    names: list[str] = []
    for name, sub in module.named_modules(remove_duplicate=False):
        names.append(name)
        if id(sub) in seen and seen[id(sub)] != name:
            twice.add(id(sub))
        seen.setdefault(id(sub), name)
    te_roots: list[str] = []
    built = {id(m) for m in built_by_mixprec}
    for name, sub in module.named_modules():
        if any(name.startswith(root + ".") for root in te_roots):
            continue  # inside a TE layer
        pattern = match_module(name, patterns)
        if _is_te(sub):
            te_roots.append(name)
            if id(sub) not in built:
                plan.foreign_te.append(name or "(the model itself)")
            elif pattern is not None:
                plan.revert.append(name)
            continue
        kind = next((k for cls, k in _KINDS.items() if isinstance(sub, cls)), None)
        if kind is None:
            continue
        if not name:
            plan.decisions.append(LayerDecision("(the model itself)", kind, False,
                                                "a model that is one layer cannot be replaced in "
                                                "place; wrap a module that holds it"))
        elif pattern is not None:
            plan.decisions.append(LayerDecision(name, kind, False, f"excluded by ignore_modules ({pattern!r})"))
        elif id(sub) in twice:
            plan.decisions.append(LayerDecision(name, kind, False, "registered under more than one name"))
        else:
            plan.decisions.append(_decide(name, sub, kind,
                                          te_has_rmsnorm=te_has_rmsnorm, shared=shared))
    # every pattern on its own: one that selects a module an earlier one also selects
    # is used too
    plan.unmatched_ignores = unmatched_patterns(names, patterns)
    return plan
