"""The `Measurement` record: what was measured, on which runtime and hardware, and the figures."""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

SCHEMA_VERSION = 1


@dataclass
class Measurement:
    """One model measured once. Serialises to JSON with :meth:`to_dict`.

    Items are tokens for causal LMs (generated tokens: throughput, energy and dollars are per
    decoded token) and inputs (sentences, images, rows) otherwise.
    """

    model: str
    task: str
    runtime: str
    hardware: str
    threads: int
    item: str
    batch_size: int
    seq_len: int | None
    params: int
    weight_bytes: int
    disk_bytes: int
    disk_source: str
    flops_per_item: float | None
    latency_ms: dict
    throughput_per_s: float
    peak_memory_bytes: int
    peak_memory_method: str
    energy_j_per_item: float
    energy_source: str
    usd_per_million: float
    usd_per_hour: float
    quality: dict | None = None
    fidelity: dict | None = None
    prefill_tokens_per_s: float | None = None
    decode_tokens_per_s: float | None = None
    decode_roofline_tokens_per_s: float | None = None
    roofline_fraction: float | None = None
    memory_bandwidth_gbs: float | None = None
    decode: dict | None = None
    sparse: dict | None = None
    host: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    schema_version: int = SCHEMA_VERSION

    def to_dict(self) -> dict:
        out = asdict(self)
        if out["quality"] is None:
            out["quality"] = {"metric": None, "value": None}
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False)

    @classmethod
    def from_dict(cls, data: dict) -> Measurement:
        return cls(**data)


def write_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same folder and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        from ..outputs import file_mode

        os.chmod(tmp, file_mode())  # mkstemp creates 0600; results follow the umask like any file
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
