"""What every benchmark workload is run with."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field

__all__ = ["Options"]


@dataclass(frozen=True)
class Options:
    """`quick`: about 10x fewer iterations; `redis_url`: None starts an embedded Redis;
    `soak_steps`: the soak's length, if not its default; `failure_timeout`: the soak's
    agents' (its workers' and its driver's)."""

    quick: bool = False
    redis_url: str | None = None
    namespace: str = field(default_factory=lambda: "bench-" + uuid.uuid4().hex[:8])
    soak_steps: int | None = None
    failure_timeout: float = 5.0
