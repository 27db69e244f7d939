"""The author-facing vocabulary of parallelism: placements, module-boundary annotations and
the device mesh. Small frozen values; no logic about collectives (that is `passes/`).

    Replicate()      R      every rank holds the whole value
    Shard(d)         S(d)   rank r holds the r-th equal part of dim d
    Shard(d, k)      S(d)xk dim d is k equal chunks (a fused [gate ; up]); each is split
    Partial()        P      every rank holds a summand; the value is their sum

`@placement(inputs=..., outputs=..., group=..., params=..., experts=...)` on a module class
(or `placement(...)(module)` on one instance) says how values cross that module's boundary
and over which group of the mesh its inside is split. Inside, the compiler chooses every
parameter's sharding so that the module needs no communication; an author pins a parameter
with `params={"kv_a_proj_with_mqa.weight": Replicate()}` where the choice is theirs.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Union

__all__ = ["GROUPS", "Mesh", "Partial", "Placement", "PlacementSpec", "Replicate", "Shard",
           "get_placement", "parse_placement", "placement"]


@dataclass(frozen=True, slots=True)
class Replicate:
    def __repr__(self) -> str:
        return "R"


@dataclass(frozen=True, slots=True)
class Shard:
    dim: int
    chunks: int = 1

    def __post_init__(self) -> None:
        if self.chunks < 1:
            raise ValueError(f"Shard(dim={self.dim}, chunks={self.chunks}): chunks must be >= 1")

    def __repr__(self) -> str:
        return f"S({self.dim})" + (f"x{self.chunks}" if self.chunks > 1 else "")


@dataclass(frozen=True, slots=True)
class Partial:
    def __repr__(self) -> str:
        return "P"


Placement = Union[Replicate, Shard, Partial]


def parse_placement(text: str) -> Placement:
    """Inverse of repr: "R", "P", "S(1)", "S(0)x2"."""
    text = text.strip()
    if text == "R":
        return Replicate()
    if text == "P":
        return Partial()
    if text.startswith("S(") and ")" in text:
        dim, _, rest = text[2:].partition(")")
        return Shard(int(dim), int(rest[1:]) if rest.startswith("x") else 1)
    raise ValueError(f"not a placement: {text!r} (expected R, P, S(d) or S(d)xk)")


# The mesh's parallel axes. Attention, dense MLPs and MoE layers may use different degrees
# (e.g. attention replicated, MLP split). Each degree is 1 or the world size for now: an
# axis smaller than the world would need data-parallel attention, not built yet.
GROUPS = ("attn", "dense", "moe")


@dataclass(frozen=True, slots=True)
class Mesh:
    world_size: int
    attn_tp: int
    dense_tp: int
    moe_tp: int = 1
    moe_ep: int = 1

    def __post_init__(self) -> None:
        if self.world_size < 1:
            raise ValueError(f"Mesh: world_size must be >= 1, got {self.world_size}")
        for name in ("attn_tp", "dense_tp", "moe_tp", "moe_ep"):
            v = getattr(self, name)
            if v not in (1, self.world_size):
                raise ValueError(
                    f"Mesh: {name.replace('_', '-')}={v} must be 1 or the world size "
                    f"{self.world_size} (a smaller group would need data-parallel "
                    f"attention, which is not supported)")
        if self.moe_tp > 1 and self.moe_ep > 1:
            raise ValueError(f"Mesh: MoE is either tensor parallel (moe-tp={self.moe_tp}) or "
                             f"expert parallel (moe-ep={self.moe_ep}), not both")

    @classmethod
    def build(cls, tp: int, attn_tp: int | None = None, moe_tp: int | None = None,
              moe_ep: int | None = None) -> Mesh:
        """The CLI's view: `--tp N` sets every axis; `--attn-tp`, `--moe-tp`, `--moe-ep`
        override one (moe-ep turns MoE tensor parallelism off)."""
        if moe_ep is not None and moe_ep > 1:
            moe_tp = 1 if moe_tp is None else moe_tp
        return cls(world_size=tp, attn_tp=tp if attn_tp is None else attn_tp, dense_tp=tp,
                   moe_tp=tp if moe_tp is None else moe_tp, moe_ep=moe_ep or 1)

    def size(self, group: str) -> int:
        if group == "attn":
            return self.attn_tp
        if group == "dense":
            return self.dense_tp
        if group == "moe":
            return max(self.moe_tp, self.moe_ep)
        raise ValueError(f"unknown mesh group {group!r}; expected one of {GROUPS}")

    def style(self, group: str) -> str:
        """'ep' when the group splits whole experts, else 'tp'."""
        return "ep" if group == "moe" and self.moe_ep > 1 else "tp"

    def describe(self) -> str:
        moe = f"MoE EP{self.moe_ep}" if self.moe_ep > 1 else f"MoE TP{self.moe_tp}"
        return (f"world {self.world_size}: Attention TP{self.attn_tp} + Dense TP{self.dense_tp}"
                f" + {moe}")

    def to_json(self) -> dict[str, int]:
        return {"world_size": self.world_size, "attn_tp": self.attn_tp,
                "dense_tp": self.dense_tp, "moe_tp": self.moe_tp, "moe_ep": self.moe_ep}


PlacementArg = Union[Placement, tuple[Union[Placement, None], ...], None]


@dataclass(frozen=True, slots=True)
class PlacementSpec:
    """What `@placement` attaches. `inputs`/`outputs`: one placement (the first positional
    input / the output) or a tuple aligned with positional inputs / tuple outputs, None for
    "unconstrained". `experts`: names of parameters whose dim 0 indexes experts; under MoE
    expert parallelism they are split on that dim (and so is routing work)."""
    inputs: tuple[Placement | None, ...]
    outputs: tuple[Placement | None, ...]
    group: str
    params: tuple[tuple[str, Placement], ...] = ()
    experts: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        if self.group not in GROUPS:
            raise ValueError(f"@placement(group={self.group!r}): expected one of {GROUPS}")


_ATTR = "__tscompile_placement__"


def _as_tuple(value: PlacementArg) -> tuple[Placement | None, ...]:
    if value is None:
        return ()
    return tuple(value) if isinstance(value, tuple) else (value,)


def placement(*, inputs: PlacementArg = None, outputs: PlacementArg = None,
              group: str = "dense", params: dict[str, Placement] | None = None,
              experts: tuple[str, ...] | list[str] = ()) -> Any:
    """Annotate a module class (decorator) or one module instance (`placement(...)(m)`)."""
    spec = PlacementSpec(_as_tuple(inputs), _as_tuple(outputs), group,
                         tuple(sorted((params or {}).items())), tuple(experts))

    def apply(target: Any) -> Any:
        # On a class the spec lives in the class dict; on an instance in its __dict__, so an
        # instance annotation overrides (and never leaks to) its class.
        if isinstance(target, type):
            setattr(target, _ATTR, spec)
        else:
            object.__setattr__(target, _ATTR, spec)
        return target

    return apply


def get_placement(module: Any) -> PlacementSpec | None:
    """The instance's annotation, else the nearest annotated class in its MRO (a subclass of
    an annotated module is annotated the same way unless it says otherwise)."""
    inst = getattr(module, "__dict__", {}).get(_ATTR)
    if inst is not None:
        return inst
    for cls in type(module).__mro__:
        if _ATTR in cls.__dict__:
            return cls.__dict__[_ATTR]
    return None
