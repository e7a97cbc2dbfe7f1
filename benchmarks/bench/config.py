"""``Config``: every size and setting of one run; ``benchmarks/run.py``'s ``parse_args`` fills it in."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Config:
    redis_url: str
    quick: bool
    repeat: int
    drain_items: int
    drain_timeout: float
    latency_idle_items: int
    latency_load_s: float
    load_fraction: float
    bulk_items: int
    bulk_loop_items: int
    embed_items: int | None
    cpu_embed_items: int
    gpu_embed_items: int
    embed_one_items: int
    embed_rounds: int
    embed_threads: int
    embed_timeout: float
    embed_batch: int | None
    embed_sweep_s: float
    gpusim_items: int
    gpusim_f_ms: float
    gpusim_p_ms: float
    rss_items: int
    rss_cap_s: float
    install_cbatches: bool
