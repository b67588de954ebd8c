"""The parameters of a merge: their names, the density rule, and `MergeParams`, the one carrier
of their values that the maths gets.

A merge config (`merge.config.MergeConfig`) is what a user writes; `MergeConfig.params()`,
`merge_deltas` and `merge_lora` all turn their settings into a `MergeParams` through
`MergeParams.from_settings`. Which parameters a method takes is declared by the method itself
(`Method.params` in `merge.methods`), with the names of `PARAMETERS`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import AfterValidator

from langmerge.errors import ConfigError
from langmerge.merge.regmean import ALPHA

Rescale = Literal["density", "l1", "none"]

PARAMETERS: dict[str, str] = {
    "density": "fraction of each delta kept, in (0, 1]; also per expert",
    "lam": "λ, the scale of the merged delta",
    "normalize": "divide the weighted sum by the weights (default per method)",
    "gamma": "share of the largest entries dropped as outliers",
    "epsilon": "spread of the magnitude-ranked keep probability",
    "t": "where between the two models the interpolation lands",
    "rescale": "how the entries a random drop keeps are rescaled: density, l1 or none",
    "seed": "seed of the random drop (with the tensor's name and the expert)",
    "alpha": "share of the off-diagonal Gram entries kept",
    "fallback": "the method for the tensors that are no linear map",
}
"""Every parameter a method can take, by field name, in the order messages and docs list them."""

_SPELLING = {"lam": "lambda"}


def spelled(name: str) -> str:
    """A parameter as a config file writes it: `lam` is `lambda`."""
    return _SPELLING.get(name, name)


def listed(names: frozenset[str] | set[str]) -> str:
    """Parameter names as a config writes them, in the order of `PARAMETERS`."""
    return ", ".join(spelled(n) for n in PARAMETERS if n in names) or "no parameters"


# ---------------------------------------------------------------------------------------------
# The density rule.


def check_density(value: float) -> float:
    """`value` when it is a density, a fraction in (0, 1]; a ConfigError otherwise (NaN too)."""
    if not 0.0 < value <= 1.0:
        raise ConfigError(f"density must be in (0, 1], got {value}")
    return value


def _density(value: float) -> float:
    try:
        return check_density(value)
    except ConfigError as e:  # a ValueError, so that pydantic names the field
        raise ValueError(str(e)) from None


Density = Annotated[float, AfterValidator(_density)]
"""A density for a pydantic model: a float in (0, 1], with the message of `check_density`."""


# ---------------------------------------------------------------------------------------------
# The carrier.


@dataclass(frozen=True)
class MergeParams:
    """Hyper-parameters of one merge. `density` may be one value or one per expert.

    Build it with keywords; `from_settings` also takes densities as any sequence and checks
    their count."""

    density: float | tuple[float, ...] = 1.0
    lam: float = 1.0
    normalize: bool | None = None  # None: the method's default
    gamma: float = 0.01
    epsilon: float = 0.15
    t: float = 0.5
    rescale: Rescale = "density"
    seed: int = 0
    alpha: float = ALPHA  # regmean

    def __post_init__(self) -> None:
        for d in self.density if isinstance(self.density, tuple) else (self.density,):
            check_density(d)
        if not 0.0 <= self.gamma < 1.0:
            raise ConfigError(f"gamma must be in [0, 1), got {self.gamma}")
        if not 0.0 <= self.epsilon < 1.0:
            raise ConfigError(f"epsilon must be in [0, 1), got {self.epsilon}")
        if not 0.0 <= self.t <= 1.0:
            raise ConfigError(f"slerp t must be in [0, 1], got {self.t}")
        if self.rescale not in ("density", "l1", "none"):
            raise ConfigError(f"rescale must be one of density, l1, none; got {self.rescale!r}")
        if not math.isfinite(self.lam):
            raise ConfigError(f"lambda must be a finite number, got {self.lam}")
        if not 0.0 < self.alpha <= 1.0:
            raise ConfigError(f"alpha must be in (0, 1], got {self.alpha}")

    @classmethod
    def from_settings(
        cls, experts: int, *, density: float | Sequence[float] = 1.0, **settings: Any
    ) -> MergeParams:
        """The parameters of a merge of `experts` experts, from keyword settings (the field
        names). `density` is one value or one per expert (one value when they are all equal)."""
        if isinstance(density, Sequence):
            if len(density) != experts:
                raise ConfigError(f"got {len(density)} densities for {experts} experts")
            dens: float | tuple[float, ...] = (
                density[0] if len(set(density)) == 1 else tuple(density)
            )
        else:
            dens = density
        return cls(density=dens, **settings)

    def density_of(self, i: int) -> float:
        return self.density[i] if isinstance(self.density, tuple) else self.density
