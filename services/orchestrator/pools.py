"""The pool catalogue: what each model pool is, costs and can hold
(``BATON_POOLS_FILE`` / ``BATON_POOLS``; its shape: docs/scheduling.md, "The
pool catalogue"). Workers' heartbeats report the measured figures; the
catalogue's are the prior until they do, and a drift is logged and counted.
Pure: parsing and defaults, no I/O (the settings read the file)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any

from proto.ids import is_valid_id


class CatalogueError(ValueError):
    """A pool entry that cannot be used, with where it is."""


@dataclass(frozen=True, slots=True)
class PoolSpec:
    name: str
    model: str = ""
    max_model_len: int = 2048
    kv_tokens: int = 65_536
    max_seqs: int = 64
    prefill_tps: float = 2_000.0
    decode_tps: float = 30.0
    usd_per_gpu_hour: float = 2.0
    cold_start_s: float = 90.0
    min_replicas: int = 0
    max_replicas: int = 4
    extra: dict[str, Any] = field(default_factory=dict, compare=False)
    # In the catalogue (False: defaults for a pool it does not list, whose
    # cold start nobody declared: a step there is not held for capacity).
    listed: bool = True


_NUMBERS = {f.name for f in fields(PoolSpec)} - {"name", "model", "extra", "listed"}
_POSITIVE = {"max_model_len", "kv_tokens", "max_seqs", "prefill_tps", "decode_tps"}


def parse_catalogue(doc: Any) -> dict[str, PoolSpec]:
    """``{"pools": {name: {...}}}`` (or the inner map) as specs.

    Raises:
        CatalogueError: an unknown key, a bad name or a figure out of range.
    """
    pools = doc.get("pools", doc) if isinstance(doc, dict) else None
    if not isinstance(pools, dict):
        raise CatalogueError("the pool catalogue must be a map of pools (under `pools:`)")
    out = {}
    for name, entry in pools.items():
        if not isinstance(name, str) or not is_valid_id(name):
            raise CatalogueError(f"pools.{name}: a pool name must match [A-Za-z0-9_-]{{1,64}}")
        if not isinstance(entry, dict):
            raise CatalogueError(f"pools.{name}: must be a map")
        unknown = set(entry) - _NUMBERS - {"model"}
        if unknown:
            raise CatalogueError(f"pools.{name}: unknown keys {sorted(unknown)}")
        for key in _NUMBERS & set(entry):
            value = entry[key]
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise CatalogueError(f"pools.{name}.{key}: must be a number")
            low_ok = value > 0 if key in _POSITIVE else value >= 0
            if not (math.isfinite(value) and low_ok):
                raise CatalogueError(f"pools.{name}.{key}: out of range ({value!r})")
        spec = PoolSpec(name=name, **entry)
        if spec.min_replicas > spec.max_replicas:
            raise CatalogueError(f"pools.{name}: min_replicas above max_replicas")
        out[name] = spec
    return out


UNLISTED_MODEL_LEN = 1 << 30
"""The context limit assumed of a pool the catalogue does not list: none."""


@dataclass(frozen=True, slots=True)
class Catalogue:
    """The pools by name; a pool it does not list gets defaults (priced by
    ``BATON_GPU_HOUR_USD``) so an unlisted pool still schedules, and no
    context limit (``UNLISTED_MODEL_LEN``): its workers decide what fits, as
    before the catalogue existed."""

    pools: dict[str, PoolSpec]
    default_price: dict[str, float] = field(default_factory=dict)

    def spec(self, name: str) -> PoolSpec:
        found = self.pools.get(name)
        if found is not None:
            return found
        price = self.default_price.get(name, self.default_price.get("default", 0.0))
        return PoolSpec(
            name=name, usd_per_gpu_hour=price, max_model_len=UNLISTED_MODEL_LEN, listed=False
        )

    def listed(self, name: str) -> bool:
        return name in self.pools

    def price(self, name: str) -> float:
        return self.spec(name).usd_per_gpu_hour


@dataclass(frozen=True, slots=True)
class Drift:
    pool: str
    figure: str
    catalogue: float
    measured: float


def drifts(spec: PoolSpec, measured: dict[str, float], tolerance: float = 0.5) -> list[Drift]:
    """The catalogue figures of ``spec`` more than ``tolerance`` (a fraction)
    away from what a worker measured (keys as ``PoolSpec``'s fields)."""
    out = []
    for figure, value in sorted(measured.items()):
        stated = getattr(spec, figure, None)
        if not isinstance(stated, int | float) or value <= 0 or stated <= 0:
            continue
        if abs(value - stated) / stated > tolerance:
            out.append(Drift(spec.name, figure, float(stated), float(value)))
    return out
