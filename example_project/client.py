"""Three concurrent ``POST /add`` requests: ``python -m example_project.client [BASE_URL]``.

Against ``uvicorn example_project.web:api`` and ``celery -A example_project worker -Q gpu``, the
worker runs them as two executions of ``batch_add`` (``max_batch_size=2``): ``xs=[1, 2]
ys=[300, 200]`` at once, then ``xs=[3] ys=[100]`` after ``wait_ms`` -- see the worker's output.
The base URL comes from the first argument, else ``EXAMPLE_API_URL``, else
``http://127.0.0.1:8000``.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time

import httpx

PAIRS = [(1, 300), (2, 200), (3, 100)]


async def main(base_url: str) -> list[int]:
    async with httpx.AsyncClient(base_url=base_url, timeout=60) as client:
        t0 = time.monotonic()
        responses = await asyncio.gather(
            *(client.post("/add", json={"x": x, "y": y}) for x, y in PAIRS))
        elapsed = time.monotonic() - t0
    results = []
    for (x, y), response in zip(PAIRS, responses):
        response.raise_for_status()
        result = response.json()["result"]
        results.append(result)
        print(f"{x} + {y} = {result}")
    print(f"3 concurrent requests answered in {elapsed:.2f}s")
    return results


if __name__ == "__main__":
    url = sys.argv[1] if len(sys.argv) > 1 else os.environ.get("EXAMPLE_API_URL", "http://127.0.0.1:8000")
    try:
        asyncio.run(main(url))
    except httpx.HTTPError as exc:
        sys.exit(f"error: {type(exc).__name__}: {exc} (is `uvicorn example_project.web:api` running at {url}?)")
