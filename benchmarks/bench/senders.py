"""Enqueueing without a worker: task messages put straight on a Redis queue list (``RawEnqueuer``),
and a plain Celery app to send with."""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import Iterable, Sequence
from typing import Any


class RawEnqueuer:
    """Puts Celery task messages straight on a Redis queue list, many per round trip.

    The message is a template copied from a real ``send_task`` publish (so its format is
    exactly what this kombu/Celery produce); per item only the task id, arguments, argsrepr and
    delivery tag change. Used to pre-load queues fast (not a measured path).
    """

    def __init__(self, app: Any, task_name: str, r: Any) -> None:
        scratch = f"bench.template.{uuid.uuid4().hex[:8]}"
        app.send_task(task_name, args=(0, 0), queue=scratch)
        raw = r.lrange(scratch, 0, -1)
        r.delete(scratch)
        if len(raw) != 1:
            raise RuntimeError(f"template publish left {len(raw)} messages on {scratch}")
        env = json.loads(raw[0])
        if env["properties"].get("body_encoding") != "base64":
            raise RuntimeError(f"unexpected body encoding {env['properties'].get('body_encoding')}")
        body = json.loads(base64.b64decode(env["body"]))
        self.envelope = env
        self.embed = body[2]
        self.task_name = task_name

    def messages(self, ids: Sequence[str], arg_tuples: Sequence[Sequence[Any]],
                 queue: str) -> Iterable[str]:
        env, embed = self.envelope, self.embed
        headers0, props0 = env["headers"], env["properties"]
        delivery_info = {**props0.get("delivery_info", {}), "routing_key": queue}
        for tid, args in zip(ids, arg_tuples):
            body = base64.b64encode(json.dumps([list(args), {}, embed]).encode()).decode()
            headers = {**headers0, "id": tid, "root_id": tid, "argsrepr": repr(tuple(args))}
            props = {**props0, "correlation_id": tid, "delivery_tag": str(uuid.uuid4()),
                     "delivery_info": delivery_info}
            yield json.dumps({**env, "body": body, "headers": headers, "properties": props})

    def push(self, r: Any, queue: str, ids: Sequence[str], arg_tuples: Sequence[Sequence[Any]],
             chunk: int = 5_000) -> None:
        """LPUSH in order: the first item is consumed first (kombu BRPOPs the list's tail)."""
        batch: list[str] = []
        for msg in self.messages(ids, arg_tuples, queue):
            batch.append(msg)
            if len(batch) >= chunk:
                r.lpush(queue, *batch)
                batch = []
        if batch:
            r.lpush(queue, *batch)


def sender_app(redis_url: str) -> Any:
    from celery import Celery

    app = Celery("bench_sender", broker=redis_url, backend=redis_url)
    app.conf.update(task_serializer="json", result_serializer="json", accept_content=["json"],
                    broker_connection_retry_on_startup=True)
    return app
