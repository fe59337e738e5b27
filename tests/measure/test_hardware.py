import pytest

from leanml.errors import LeanmlError
from leanml.measure.hardware import DEFAULT_HARDWARE, get_profile, list_profiles, usd_per_million


def test_at_least_six_profiles_cpu_and_gpu():
    profiles = list_profiles()
    assert len(profiles) >= 6 and DEFAULT_HARDWARE in profiles
    assert {p.kind for p in profiles.values()} == {"cpu", "gpu"}
    for p in profiles.values():
        assert p.usd_per_hour > 0 and p.power_w > 0 and p.memory_bandwidth_gbs > 0 and p.price_date


def test_dollars_per_million_formula():
    p = get_profile("aws-c6i.large", price_per_hour=3.6)  # one cent per 10 s
    assert usd_per_million(0.001, p) == pytest.approx(3.6 / 3600 * 0.001 * 1e6)  # = $1 per million
    assert p.price_kind == "user override"


def test_bad_hardware():
    with pytest.raises(LeanmlError, match="unknown hardware 'tpu'; accepted: "):
        get_profile("tpu")
    with pytest.raises(LeanmlError, match="--price-per-hour -1"):
        get_profile(None, price_per_hour=-1)
