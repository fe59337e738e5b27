"""Hardware profiles: the price, power and memory bandwidth of a named machine (``hardware/*.yaml``)."""

from __future__ import annotations

import math
from importlib import resources

import yaml
from pydantic import BaseModel, ConfigDict, Field

from ..errors import LeanmlError

DEFAULT_HARDWARE = "aws-c6i.large"


class HardwareProfile(BaseModel):
    """One machine one can rent: what it costs per hour and what it draws."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    kind: str = Field(pattern="^(cpu|gpu)$")
    provider: str
    instance: str
    region: str
    device: str
    vcpus: int
    memory_gib: float
    memory_bandwidth_gbs: float
    power_w: float = Field(gt=0)
    usd_per_hour: float = Field(gt=0)
    price_kind: str
    price_date: str
    notes: str = ""


def list_profiles() -> dict[str, HardwareProfile]:
    """Every shipped profile by name."""
    folder = resources.files("leanml") / "hardware"
    out = {}
    for entry in sorted(folder.iterdir(), key=lambda e: e.name):
        if entry.name.endswith(".yaml"):
            profile = HardwareProfile(**yaml.safe_load(entry.read_text()))
            out[profile.name] = profile
    return out


def get_profile(name: str | None = None, price_per_hour: float | None = None) -> HardwareProfile:
    """The profile called ``name`` (default :data:`DEFAULT_HARDWARE`), its price overridden if given."""
    profiles = list_profiles()
    name = name or DEFAULT_HARDWARE
    if name not in profiles:
        raise LeanmlError(f"unknown hardware {name!r}; accepted: {', '.join(profiles)}")
    profile = profiles[name]
    if price_per_hour is not None:
        number = isinstance(price_per_hour, (int, float)) and not isinstance(price_per_hour, bool)
        if not number or not math.isfinite(price_per_hour) or not price_per_hour > 0:
            raise LeanmlError(
                f"--price-per-hour {price_per_hour!r} is not accepted; give a finite, positive number of dollars per hour"
            )
        profile = profile.model_copy(update={"usd_per_hour": float(price_per_hour), "price_kind": "user override"})
    return profile


def usd_per_million(seconds_per_item: float, profile: HardwareProfile) -> float:
    """Dollars for a million items when one item takes ``seconds_per_item`` on the whole instance."""
    return profile.usd_per_hour / 3600.0 * seconds_per_item * 1e6
