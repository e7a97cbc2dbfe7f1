"""Pins on the Celery and kombu internals celery_batched mirrors or reaches into.

Each function celery_batched mirrors is listed with the hash of its source in every release CI
runs (celery 5.6.3, 5.7.0; kombu 5.6.2, 5.7.0). A new release that changes one of
them fails here, naming the function and the module of ours that mirrors it: read the diff, update
the mirror if the behaviour changed, then add the new hash. The attributes we reach for are
checked too, and the messages and results we encode ourselves are compared, decoded, with what
kombu and Celery would have written.
"""

from __future__ import annotations

import ast
import hashlib
import importlib
import json
import textwrap
import time
from pathlib import Path

import pytest
import redis

from .conftest import REDIS_URL
from .servers import RedisServer

#: (file in the package, qualified name, known source hashes, may be absent, our mirror).
MIRRORED = [
    ("celery/worker/strategy.py", "default", ('3ce288f83ac588de', '6baf864d983fbf35'), False, "worker.strategy (batching_strategy)"),  # 5.6.3: 3ce288f83ac588de; 5.7.0: 6baf864d983fbf35
    ("celery/worker/strategy.py", "hybrid_to_proto2", ('d19a0663d49ebafa',), False, "_internals.trace.decode_body"),  # 5.6.3,5.7.0: d19a0663d49ebafa
    ("celery/worker/consumer/consumer.py", "Consumer.create_task_handler", ('0d187fd14146cf64', 'c5e923d322c5551f'), False, "worker.strategy (receive_direct), _internals.worker.ack_promises"),  # 5.6.3: c5e923d322c5551f; 5.7.0: 0d187fd14146cf64
    ("celery/worker/consumer/consumer.py", "Consumer.call_soon", ('67a8495bc3442f65', 'a7e5af8a7da8b30e'), False, "worker.handoff"),  # 5.6.3: 67a8495bc3442f65; 5.7.0: a7e5af8a7da8b30e
    ("celery/worker/request.py", "Request.__init__", ('00728bc9b7c6a648',), False, "_internals.trace.make_context / delivery_details"),  # 5.6.3,5.7.0: 00728bc9b7c6a648
    ("celery/worker/request.py", "Request.on_accepted", ('2746e351b95ff5ad',), False, "worker.completion.Completion.accepted"),  # 5.6.3,5.7.0: 2746e351b95ff5ad
    ("celery/worker/request.py", "Request.on_success", ('e51c750de9394de8',), False, "worker.completion.Completion.finished"),  # 5.6.3,5.7.0: e51c750de9394de8
    ("celery/worker/request.py", "Request.terminate", ('266a5a0ca8d0a21b',), False, "worker.item.Item.terminate"),  # 5.6.3,5.7.0: 266a5a0ca8d0a21b
    ("celery/worker/request.py", "Request.cancel", ('09dc120fa6a93d0e',), False, "worker.item.Item.cancel"),  # 5.6.3,5.7.0: 09dc120fa6a93d0e
    ("celery/worker/request.py", "Request.revoked", ('4d013a70be8c0388', 'fe824d04e0db6d41'), False, "worker.item.Item.revoked"),  # 5.6.3: 4d013a70be8c0388; 5.7.0: fe824d04e0db6d41
    ("celery/worker/request.py", "Request.send_event", ('e570e5836a6ff840',), False, "_internals.worker.task_events_on, _internals.events.BatchEventer"),  # 5.6.3,5.7.0: e570e5836a6ff840
    ("celery/app/trace.py", "TraceInfo.handle_error_state", ('210b92b8d65e4b71',), False, "_internals.trace.store_errors_for"),  # 5.6.3,5.7.0: 210b92b8d65e4b71
    ("celery/app/trace.py", "TraceInfo.handle_retry", ('0160b5e8147c5af3',), False, "_internals.trace.record_retry"),  # 5.6.3,5.7.0: 0160b5e8147c5af3
    ("celery/app/trace.py", "TraceInfo.handle_failure", ('ae47dce0b3423b0c',), False, "_internals.trace.exception_info / failure_hooks"),  # 5.6.3,5.7.0: ae47dce0b3423b0c
    ("celery/app/trace.py", "build_tracer", ('4bc5ab0983dd542c', '8e58aaa057dfa2f5'), False, "_internals.trace.dispatch_callbacks_and_chain / run_success_hooks / make_context"),  # 5.6.3: 8e58aaa057dfa2f5; 5.7.0: 4bc5ab0983dd542c
    ("celery/app/autoretry.py", "add_autoretry_behaviour", ('2a704958c8913af7', 'c38cc00a8ee94a08'), False, "_internals.trace.autoretry"),  # 5.6.3: c38cc00a8ee94a08; 5.7.0: 2a704958c8913af7
    ("celery/worker/state.py", "task_reserved", ('31688234dd7ecd41', 'b71f4c63208f32a1'), False, "_internals.worker.task_reserved"),  # 5.6.3: b71f4c63208f32a1; 5.7.0: 31688234dd7ecd41
    ("celery/worker/state.py", "task_accepted", ('fda3b2b9d59c296f',), False, "_internals.worker.task_accepted_many"),  # 5.6.3,5.7.0: fda3b2b9d59c296f
    ("celery/worker/state.py", "task_ready", ('3704ce88d5e47592', 'd64c26922521631c'), False, "_internals.worker.task_ready_many"),  # 5.6.3: 3704ce88d5e47592; 5.7.0: d64c26922521631c
    ("celery/backends/base.py", "Backend._get_result_meta", ('5d9db42b981c81cc', 'f2eda460217b455e'), False, "encoding.MetaEncoder"),  # 5.6.3: f2eda460217b455e; 5.7.0: 5d9db42b981c81cc
    ("celery/backends/base.py", "Backend.encode", ('0bf9f5f8380b5080', '40b85404d39b6d0b'), False, "encoding.MetaEncoder"),  # 5.6.3: 0bf9f5f8380b5080; 5.7.0: 40b85404d39b6d0b
    ("celery/backends/base.py", "Backend.decode", ('6918c6f30ffccb44', 'a13d0ecb9c737b3b'), False, "_internals.redis_results.read"),  # 5.6.3: 6918c6f30ffccb44; 5.7.0: a13d0ecb9c737b3b
    ("celery/backends/base.py", "Backend.decode_result", ('d326e74ba9a755a7',), False, "_internals.redis_results.read"),  # 5.6.3,5.7.0: d326e74ba9a755a7
    ("celery/backends/base.py", "Backend.encode_result", ('8f2e43ecf6bbe298', 'ba6b6ba5766f9d1b'), False, "encoding.MetaEncoder._dict_meta"),  # 5.6.3: ba6b6ba5766f9d1b; 5.7.0: 8f2e43ecf6bbe298
    ("celery/backends/base.py", "BaseKeyValueStoreBackend._store_result", ('71146636916f03c9',), False, "_internals.redis_results.store (the SUCCESS guard)"),  # 5.6.3,5.7.0: 71146636916f03c9
    ("celery/backends/redis.py", "RedisBackend._set", ('5a285b0354da1566', '5cb2c7690b748d1c'), False, "_internals.redis_results.store"),  # 5.6.3: 5a285b0354da1566; 5.7.0: 5cb2c7690b748d1c
    ("celery/backends/redis.py", "RedisBackend.set", ('7698af42c0706c55', '96a4ae54ec3dbe2a'), False, "_internals.redis_results.store"),  # 5.6.3: 7698af42c0706c55; 5.7.0: 96a4ae54ec3dbe2a
    ("celery/backends/redis.py", "RedisBackend.ensure", ('8cca4c4547333345',), False, "_internals.redis_results.store"),  # 5.6.3,5.7.0: 8cca4c4547333345
    ("celery/result.py", "AsyncResult.__init__", ('5f46e67be38d4cb2',), False, "_internals.client.LazyAsyncResult"),  # 5.6.3,5.7.0: 5f46e67be38d4cb2
    ("celery/result.py", "AsyncResult._maybe_set_cache", ('cf023d72d1e6cf95',), False, "client.submit.ItemResults.get"),  # 5.6.3,5.7.0: cf023d72d1e6cf95
    ("celery/app/amqp.py", "AMQP.as_task_v2", ('7c5260c10ab40b50', 'bff0bfe4dc600e2f'), False, "client.submit._BulkSend (message template, sent_event)"),  # 5.6.3: bff0bfe4dc600e2f; 5.7.0: 7c5260c10ab40b50
    ("celery/events/dispatcher.py", "EventDispatcher._prepare_event", ('74ec8b5a5dcee3b6',), True, "_internals.client.prepare_event"),  # 5.6.3: absent; 5.7.0: 74ec8b5a5dcee3b6
    ("celery/events/dispatcher.py", "EventDispatcher.publish", ('a5dc9eed11022e18', 'cecb85504c95a0ca'), False, "_internals.client.prepare_event, _internals.kombu_redis.RedisBulkPublisher.publish_event"),  # 5.6.3: a5dc9eed11022e18; 5.7.0: cecb85504c95a0ca
    ("celery/events/dispatcher.py", "EventDispatcher.send", ('adfcf9b0930f443b', 'f0926b2293574880'), False, "_internals.worker.task_events_on"),  # 5.6.3: adfcf9b0930f443b; 5.7.0: f0926b2293574880
    ("celery/bootsteps.py", "Blueprint.start", ('572ddc1bbc726b77',), False, "_internals.blueprint.attach_step"),  # 5.6.3,5.7.0: 572ddc1bbc726b77
    ("celery/bootsteps.py", "Blueprint.stop", ('87d72fed144937dc',), False, "_internals.blueprint.attach_step, worker_stopping"),  # 5.6.3,5.7.0: 87d72fed144937dc
    ("celery/bootsteps.py", "Blueprint.send_all", ('64656cfabc016564',), False, "_internals.blueprint.attach_step"),  # 5.6.3,5.7.0: 64656cfabc016564
    ("celery/worker/state.py", "maybe_shutdown", ('2cf835161a58ecfa',), False, "_internals.blueprint.worker_stopping"),  # 5.6.3,5.7.0: 2cf835161a58ecfa
    ("celery/worker/consumer/tasks.py", "Tasks.start", ('0db82e24ad1e8bbf', '8bc37ce0ce91789e'), False, "worker.service.BatchingService._disable_prefetch"),  # 5.6.3: 0db82e24ad1e8bbf; 5.7.0: 8bc37ce0ce91789e
    ("celery/worker/consumer/events.py", "Events.__init__", ('fa2f13ccc0c48e1a',), False, "_internals.worker.task_events_on"),  # 5.6.3,5.7.0: fa2f13ccc0c48e1a
    ("celery/events/state.py", "Task.event", ('df11864befc2e96a',), False, "_internals.events.register_batch_fields (unknown fields kept)"),  # 5.6.3,5.7.0: df11864befc2e96a
    ("celery/events/state.py", "Task.as_dict", ('d85f8c7eca90381e',), False, "_internals.events.register_batch_fields (_fields)"),  # 5.6.3,5.7.0: d85f8c7eca90381e
    ("celery/events/state.py", "Task.info", ('dbc8310f9a8bc904',), False, "_internals.events.register_batch_fields (_info_fields)"),  # 5.6.3,5.7.0: dbc8310f9a8bc904
    ("celery/bin/control.py", "_compile_arguments", ('49b046417dd41c0f',), False, "worker.control.configure_batching (variadic settings)"),  # 5.6.3,5.7.0: 49b046417dd41c0f
    ("kombu/transport/redis.py", "Channel._brpop_read", ('5139cdc4fd9a716a', 'c2e423dfeda85f81'), False, "_internals.kombu_redis.install_bulk_fetch / guard_close"),  # 5.6.2: 5139cdc4fd9a716a; 5.7.0: c2e423dfeda85f81
    ("kombu/transport/redis.py", "Channel.close", ('5ca5e6f0419f385a',), False, "_internals.kombu_redis.guard_close"),  # 5.6.2,5.7.0: 5ca5e6f0419f385a
    ("celery/worker/request.py", "Request.on_failure", ('fc398abf001e4690', '618a2c649c8a8bbc'), False, "_internals.worker.HeldAcks, worker.completion.Completion._handle"),  # 5.6.3: fc398abf001e4690; 5.7.0: 618a2c649c8a8bbc
    ("celery/worker/request.py", "Request.on_timeout", ('dedfab5a7a2c9491', '6673ada7271e2d5e'), False, "_internals.worker.HeldAcks, worker.completion.Completion.timed_out"),  # 5.6.3: dedfab5a7a2c9491; 5.7.0: 6673ada7271e2d5e
    ("celery/worker/request.py", "Request.acknowledge", ('d54d07070d38dc2d',), False, "_internals.worker.HeldAcks (_on_ack)"),  # 5.6.3,5.7.0: d54d07070d38dc2d
    ("celery/worker/request.py", "Request.reject", ('6ccd01a4f608220a',), False, "_internals.worker.HeldAcks (_on_reject)"),  # 5.6.3,5.7.0: 6ccd01a4f608220a
    ("celery/backends/base.py", "Backend._ensure_retryable", ('cd2ad4e2fdf2368b',), True, "_internals.trace.is_outage (BackendStoreError's context), write_retried"),  # 5.6.3: absent; 5.7.0: cd2ad4e2fdf2368b
    ("celery/backends/base.py", "Backend.store_result", ('0cb6b1b0f1c1fd82', '1edd4057ee1dfecb'), False, "_internals.trace.write_retried / store_results"),  # 5.6.3: 0cb6b1b0f1c1fd82; 5.7.0: 1edd4057ee1dfecb
    ("celery/app/base.py", "Celery.send_task", ('f1136ece96a0570e', 'ebff3ef3504b097f'), False, "client.submit._BulkSend (reply_to)"),  # 5.6.3: f1136ece96a0570e; 5.7.0: ebff3ef3504b097f
    ("kombu/transport/redis.py", "QoS.append", ('6883fd4024f51ad8',), False, "_internals.kombu_redis._POP_AND_TRACK / _deliver_more"),  # 5.6.2,5.7.0: 6883fd4024f51ad8
    ("kombu/transport/redis.py", "QoS._remove_from_indices", ('bda3c1298cc3e698',), False, "_internals.kombu_redis.ack_many"),  # 5.6.2,5.7.0: bda3c1298cc3e698
    ("kombu/transport/redis.py", "Channel._put", ('15ace6be28b0218e', '8cbd1540bed9a9d2'), False, "_internals.kombu_redis.RedisBulkPublisher.publish_task"),  # 5.6.2: 8cbd1540bed9a9d2; 5.7.0: 15ace6be28b0218e
    ("kombu/transport/redis.py", "Channel._put_fanout", ('7f9db1dc06ad327a', 'eb6c75971d525763'), False, "_internals.kombu_redis.RedisBulkPublisher.publish_event"),  # 5.6.2: 7f9db1dc06ad327a; 5.7.0: eb6c75971d525763
    ("kombu/transport/redis.py", "Channel._get_publish_topic", ('28efaf4438bd1841',), False, "_internals.kombu_redis.RedisBulkPublisher.set_event_template"),  # 5.6.2,5.7.0: 28efaf4438bd1841
    ("kombu/transport/virtual/base.py", "Channel.basic_consume", ('429ca164fbeb5f88',), False, "_internals.kombu_redis._deliver_more (direct delivery)"),  # 5.6.2,5.7.0: 429ca164fbeb5f88
    ("kombu/transport/virtual/base.py", "Channel.prepare_message", ('fc86cb08e6ce4ed8',), False, "_internals.kombu_redis.RedisBulkPublisher"),  # 5.6.2,5.7.0: fc86cb08e6ce4ed8
    ("kombu/transport/virtual/base.py", "Channel._inplace_augment_message", ('49ed8083f87ced0f',), False, "_internals.kombu_redis.RedisBulkPublisher"),  # 5.6.2,5.7.0: 49ed8083f87ced0f
    ("kombu/transport/virtual/base.py", "Channel.encode_body", ('688b14d8cae4a380',), False, "_internals.kombu_redis.RedisBulkPublisher"),  # 5.6.2,5.7.0: 688b14d8cae4a380
    ("kombu/transport/virtual/base.py", "Transport._deliver", ('112626776662e648',), False, "_internals.kombu_redis._deliver_more"),  # 5.6.2,5.7.0: 112626776662e648
    ("kombu/transport/virtual/base.py", "Message.__init__", ('117c34027c7f3eec',), False, "_internals.kombu_redis._deliver_more"),  # 5.6.2,5.7.0: 117c34027c7f3eec
    ("kombu/transport/virtual/base.py", "QoS.append", ('7dbb9ebe24bc3800',), False, "_internals.kombu_redis._POP_AND_TRACK / _deliver_more"),  # 5.6.2,5.7.0: 7dbb9ebe24bc3800
    ("kombu/transport/virtual/base.py", "QoS.ack", ('1467f5999364f592',), False, "_internals.kombu_redis.ack_many"),  # 5.6.2,5.7.0: 1467f5999364f592
    ("kombu/messaging.py", "Consumer._receive_callback", ('4504ce70e6328122',), False, "worker.strategy (receive_direct)"),  # 5.6.2,5.7.0: 4504ce70e6328122
    ("kombu/messaging.py", "Producer.publish", ('6a96f1fdbdd96138', 'acb76df4d8e717e5'), False, "client.submit._BulkSend"),  # 5.6.2: 6a96f1fdbdd96138; 5.7.0: acb76df4d8e717e5
    ("kombu/messaging.py", "Producer._publish", ('4709062e9da7194e', 'e24d6659320c2a8f'), False, "client.submit._BulkSend._send_each"),  # 5.6.2: e24d6659320c2a8f; 5.7.0: 4709062e9da7194e
    ("kombu/utils/json.py", "loads", ('137b3f07f0d880d4',), False, "_internals.kombu_redis._decode, _internals.trace.decode_body"),  # 5.6.2,5.7.0: 137b3f07f0d880d4
    ("kombu/utils/json.py", "dumps", ('6f1e68590bfda110',), False, "encoding._json, _internals.kombu_redis._Splicer"),  # 5.6.2,5.7.0: 6f1e68590bfda110
    ("kombu/utils/json.py", "object_hook", ('cf29125995c05973',), False, "_internals.kombu_redis._decode"),  # 5.6.2,5.7.0: cf29125995c05973
    ("kombu/serialization.py", "SerializerRegistry.loads", ('9eba04cf610754f3',), False, "_internals.trace.decode_body"),  # 5.6.2,5.7.0: 9eba04cf610754f3
    ("kombu/common.py", "QoS.set", ('89a13592b453b331',), False, "worker.prefetch.Prefetch"),  # 5.6.2,5.7.0: 89a13592b453b331
    ("kombu/common.py", "QoS.update", ('5f852ef8dae033e3',), False, "worker.prefetch.Prefetch"),  # 5.6.2,5.7.0: 5f852ef8dae033e3
]


def _source_hash(package: str, rel: str, qualname: str) -> str | None:
    # kombu < 5.7 replaces its package module with a lazy one that has no __spec__: locate the
    # file through the submodule itself.
    module = importlib.import_module(rel[:-len(".py")].replace("/", "."))
    root = Path(module.__file__).parents[rel.count("/")]
    source = (root / rel).read_text()
    node: ast.AST = ast.parse(source)
    for part in qualname.split("."):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) \
                    and child.name == part:
                node = child
                break
        else:
            return None
    segment = textwrap.dedent(ast.get_source_segment(source, node) or "")
    text = "\n".join(line.rstrip() for line in segment.splitlines()).strip()
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@pytest.mark.parametrize("rel, qualname, known, may_be_absent, mirror", MIRRORED,
                         ids=[f"{m[0].split('/')[0]}:{m[1]}" for m in MIRRORED])
def test_mirrored_function_is_the_one_we_mirror(rel, qualname, known, may_be_absent, mirror):
    package = rel.split("/")[0]
    digest = _source_hash(package, rel, qualname)
    if digest is None:
        assert may_be_absent, f"{package}: {rel}:{qualname} is gone; celery_batched.{mirror} relies on it"
        return
    assert digest in known, (
        f"{package} changed {rel}:{qualname} (source hash {digest}, known {known}). "
        f"celery_batched.{mirror} mirrors it: diff the function against the last known release, "
        f"update the mirror if its behaviour changed, then add {digest!r} to MIRRORED.")


@pytest.mark.parametrize("path", [
    "kombu.transport.redis.Channel._q_for_pri", "kombu.transport.redis.Channel.priority_steps",
    "kombu.transport.redis.Channel._get_message_priority", "kombu.transport.redis.Channel.conn_or_acquire",
    "kombu.transport.redis.Channel.unacked_key", "kombu.transport.redis.Channel.unacked_index_key",
    "kombu.transport.redis.Channel.keyprefix_fanout", "kombu.transport.redis.Channel.body_encoding",
    "kombu.transport.virtual.base.QoS.can_consume", "kombu.transport.virtual.base.QoS.can_consume_max_estimate",
    "kombu.transport.virtual.base.Channel.Message", "kombu.message.Message.ack_log_error",
    "kombu.message.Message.reject_log_error", "kombu.message.Message._reraise_error",
    "kombu.asynchronous.hub.Hub.add_reader", "kombu.asynchronous.hub.Hub.remove_reader",
    "kombu.common.QoS.increment_eventually", "kombu.common.QoS.decrement_eventually",
    "kombu.messaging.Producer._prepare", "kombu.messaging.Producer._delivery_details",
    "celery.worker.consumer.consumer.Consumer.on_invalid_task",
    "celery.worker.consumer.consumer.Consumer.on_decode_error",
    "celery.worker.consumer.consumer.Consumer.perform_pending_operations",
    "celery.worker.state.revoked", "celery.worker.state.requests", "celery.worker.state.active_requests",
    "celery.worker.state.reserved_requests", "celery.worker.state.total_count",
    "celery.worker.state.all_total_count", "celery.worker.control.Panel.data",
    "celery.backends.base.Backend.meta_from_decoded", "celery.backends.base.Backend.exception_to_python",
    "celery.backends.base.BaseKeyValueStoreBackend.get_key_for_task", "celery.result.AsyncResult._set_cache",
    "celery.result.AsyncResult._on_fulfilled",
    "celery.backends.base.Backend.retry_policy", "celery.backends.base.Backend.exception_safe_to_retry",
    "celery.worker.state.should_stop", "celery.worker.state.should_terminate",
    "celery.bootsteps.CLOSE", "celery.bootsteps.TERMINATE", "celery.bootsteps.RUN",
])
def test_attribute_we_use_exists(path):
    parts = path.split(".")
    for i in range(len(parts) - 1, 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for attr in parts[i:]:
            assert hasattr(obj, attr), f"{path} is gone: celery_batched reaches for it"
            obj = getattr(obj, attr)
        return
    raise AssertionError(f"can't import any module of {path}")


# ---- what we encode ourselves, against what kombu and Celery would have written -------------

@pytest.fixture
def channel():
    from kombu import Connection

    with Connection(REDIS_URL) as conn:
        yield conn.default_channel


ARGS = [(1, 2), ("naïve café — 東京 🚀", {"nested": [1.5, None, True]}), ([0.1] * 5, "quote \" and \\")]


@pytest.mark.parametrize("args", ARGS)
def test_spliced_task_message_is_kombus_own(channel, args):
    from datetime import datetime, timezone

    from kombu.utils.json import dumps

    from celery_batched._internals.kombu_redis import RedisBulkPublisher

    kwargs = {"when": datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc)}
    headers = {"lang": "py", "task": "t", "id": "", "root_id": "", "argsrepr": "", "kwargsrepr": "",
               "eta": None, "expires": None, "retries": 0, "timelimit": [None, None],
               "origin": "gen1@host", "ignore_result": False, "stamps": {}}
    props = {"correlation_id": "", "reply_to": "r", "delivery_mode": 2}
    embed = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}
    task_id, argsrepr, kwargsrepr = "0b7c1e9a-7a3f-4c1e-9d2f-1a2b3c4d5e6f", repr(args), repr(kwargs)
    own_headers = {**headers, "id": task_id, "root_id": task_id, "argsrepr": argsrepr,
                   "kwargsrepr": kwargsrepr}
    body = dumps((args, kwargs, embed)).encode()
    expected = channel.prepare_message(body, 3, "application/json", "utf-8", own_headers,
                                       {**props, "correlation_id": task_id})
    channel._inplace_augment_message(expected, "", "q")

    publisher = RedisBulkPublisher(channel, "q")
    publisher.set_task_template(3, "application/json", "utf-8", headers, props, embed)
    publisher.publish_task(task_id, args, kwargs, argsrepr, kwargsrepr,
                           expected["properties"]["delivery_tag"])
    (command, key, text), = publisher.commands
    publisher.close()
    assert (command, key) == ("LPUSH", channel._q_for_pri("q", 3))
    assert json.loads(text) == json.loads(dumps(expected))


def test_spliced_task_sent_event_is_celerys_own(channel):
    from celery import Celery
    from kombu.utils.json import dumps

    from celery_batched._internals.client import prepare_event
    from celery_batched._internals.kombu_redis import RedisBulkPublisher

    app = Celery(broker=REDIS_URL)
    dispatcher = app.events.Dispatcher(channel.connection.client, enabled=False)
    fields = {"uuid": "", "root_id": "", "parent_id": None, "name": "t", "args": "", "kwargs": "",
              "retries": 0, "eta": None, "expires": None, "queue": "q", "exchange": "",
              "routing_key": "q"}
    publisher = RedisBulkPublisher(channel, "q")
    publisher.set_event_template("celeryev", "task.sent", "application/json", "utf-8",
                                 dispatcher.headers, dispatcher.delivery_mode,
                                 prepare_event(dispatcher, "task-sent", fields))
    event = prepare_event(dispatcher, "task-sent", {**fields, "uuid": "i-d", "root_id": "i-d",
                                                    "args": "(1, 'é')", "kwargs": "{}"})
    expected = channel.prepare_message(dumps(event).encode(), 0, "application/json", "utf-8",
                                       dict(dispatcher.headers),
                                       {"delivery_mode": dispatcher.delivery_mode})
    channel._inplace_augment_message(expected, "celeryev", "task.sent")
    publisher.publish_event("i-d", "(1, 'é')", "{}", event["clock"], event["timestamp"],
                            expected["properties"]["delivery_tag"])
    (command, topic, text), = publisher.commands[-1:]
    publisher.close()
    assert (command, topic) == ("PUBLISH", channel._get_publish_topic("celeryev", "task.sent"))
    assert json.loads(text) == json.loads(dumps(expected))


@pytest.mark.parametrize("serializer", ["json", "msgpack"])
def test_spliced_result_meta_is_celerys_own(serializer):
    from celery import Celery
    from celery.app.task import Context

    from celery_batched.encoding import MetaEncoder

    app = Celery(backend=REDIS_URL)
    app.conf.update(result_serializer=serializer, result_accept_content=["json", "msgpack"])
    backend = app.backend
    values = [1, "naïve 東京", [0.1, 2.5e-8, None], {"k": [1, {"x": True}]}]
    headers = [{"id": f"id{i}", "group": "g" if i % 2 else None, "parent_id": "p" if i < 2 else None}
               for i in range(len(values))]
    ours = MetaEncoder(backend).encode([h["id"] for h in headers], headers, values,
                                       "2026-11-26T10:00:00", lambda i, exc: None)
    for h, value, encoded in zip(headers, values, ours):
        meta = backend._get_result_meta(result=value, state="SUCCESS", traceback=None,
                                        request=Context(h, group=h["group"], parent_id=h["parent_id"]))
        meta.update(task_id=h["id"], date_done="2026-11-26T10:00:00")
        assert backend.decode(encoded) == backend.decode(backend.encode(meta))


@pytest.mark.parametrize("dtype, record_bytes", [("float16", 5), ("float32", 5), ("float64", 9)])
def test_array_results_decode_to_each_rows_tolist(dtype, record_bytes):
    """An array returned by the function is encoded for msgpack all at once: every stored row
    must decode to exactly ``row.tolist()``, and float16/32 rows take 5 bytes per value."""
    import msgpack
    import numpy as np

    from celery_batched.encoding import msgpack_float_rows

    rng = np.random.default_rng(7)
    for d in (3, 384, 70_000):  # msgpack's fixarray, array16 and array32 headers
        values = rng.standard_normal((4, d)).astype(dtype) * 1e3
        rows = msgpack_float_rows(values)
        assert rows is not None
        for row, packed in zip(values, rows):
            assert msgpack.unpackb(packed) == row.tolist()
        header = 1 if d <= 15 else 3 if d < 1 << 16 else 5
        assert len(rows[0]) == header + record_bytes * d
    assert msgpack_float_rows(np.arange(6).reshape(2, 3)) is None  # ints: msgpack's own path


def test_bulk_read_is_decode_result(redis_client):
    from celery import Celery

    from celery_batched._internals import redis_results as _redis_results

    app = Celery(backend=REDIS_URL)
    backend = app.backend
    backend.mark_as_done("ok-1", [1, "é"])
    backend.mark_as_failure("bad-1", ValueError("boom"))
    got = _redis_results.read(backend, ["ok-1", "bad-1", "missing"])
    want = [backend.get_task_meta("ok-1"), backend.get_task_meta("bad-1"), None]
    assert got[0] == want[0] and got[2] is None
    assert got[1]["status"] == "FAILURE" and isinstance(got[1]["result"], ValueError)
    assert str(got[1]["result"]) == str(want[1]["result"])


# ---- safeguards ---------------------------------------------------------------------------

def test_bulk_publisher_never_pushes_a_pipeline_twice(tmp_path):
    """The server applies a pipeline but its replies come too late: redis-py's retrying
    pipeline sends it again (every message twice); ours raises and sends nothing more."""
    from kombu import Connection
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    from celery_batched._internals.kombu_redis import RedisBulkPublisher
    from celery_batched.errors import BulkPublishError

    server = RedisServer(tmp_path, False, "--enable-debug-command", "yes").start()
    try:
        retrying = redis.Redis(port=server.port, socket_timeout=0.3, retry=Retry(NoBackoff(), 1),
                               retry_on_timeout=True)
        with retrying.pipeline(transaction=False) as pipe:
            for i in range(10):
                pipe.lpush("hazard", i)
            pipe.execute_command("DEBUG", "SLEEP", "0.6")  # the replies come after the timeout
            with pytest.raises(redis.TimeoutError):
                pipe.execute()
        # The replayed pushes wait in the server behind the first DEBUG SLEEP; another client's
        # LLEN may be served before them, so wait for them (at most ~2 s).
        check = server.client()
        deadline = time.monotonic() + 2.0
        while check.llen("hazard") < 20 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert check.llen("hazard") == 20, "redis-py no longer replays: revisit this test"

        with Connection(server.url(), transport_options={"socket_timeout": 0.3}) as conn:
            channel = conn.default_channel
            publisher = RedisBulkPublisher(channel, "q")
            publisher.set_task_template(None, "application/json", "utf-8", {"id": ""}, {}, {})
            for i in range(10):
                publisher.publish_task(f"id-{i}", (i,), {}, f"({i},)", "{}", f"tag-{i}")
            publisher.add_command("DEBUG", "SLEEP", "0.6")
            with pytest.raises(BulkPublishError, match="may or may not have been") as err:
                publisher.flush()
            publisher.close()
            assert err.value.sent == 0 and err.value.uncertain == 10
            time.sleep(0.5)
            assert server.client().llen(channel._q_for_pri("q", 0)) == 10
    finally:
        server.stop()


def test_bulk_fetch_stops_at_its_byte_cap(tmp_path):
    from kombu.utils.json import dumps

    from celery_batched._internals.kombu_redis import BULK_FETCH_MAX_BYTES, _POP_AND_TRACK

    server = RedisServer(tmp_path).start()
    try:
        client = server.client()
        size = 300_000
        for i in range(40):
            client.lpush("q", dumps({"body": "x" * size, "headers": {}, "properties": {
                "delivery_tag": f"t{i}", "delivery_info": {"exchange": "", "routing_key": "q"}}}))
        popped = client.register_script(_POP_AND_TRACK)(
            keys=["unacked", "unacked_index", "q"], args=[256, 0, BULK_FETCH_MAX_BYTES])
        total = sum(len(raw) for raw in popped)
        assert 0 < len(popped) < 40
        assert total - len(popped[-1]) < BULK_FETCH_MAX_BYTES <= total
        assert client.hlen("unacked") == client.zcard("unacked_index") == len(popped)
    finally:
        server.stop()


def test_flower_task_page_lists_the_event_state_fields():
    """Flower's task page shows ``Task._fields``, where ``register_batch_fields`` puts the
    batch fields (``_internals.events``)."""
    flower = pytest.importorskip("flower")
    template = (Path(flower.__file__).parent / "templates" / "task.html").read_text()
    assert "{% for name in task._fields %}" in template
    from celery.events.state import Task

    import celery_batched  # noqa: F401  (registers the fields)

    assert set(celery_batched._internals.events.BATCH_FIELDS) <= set(Task._fields)
    assert Task().as_dict()["batch_id"] is None  # tasks never batched serialize as before


# ---- when the prefetch count is static: Tasks.qos_global (quorum queues) ---------------------

#: ``celery/worker/consumer/tasks.py`` ``Tasks.qos_global``, mirrored by
#: ``_internals.worker.static_prefetch_queue``. 5.6.3: 615bea7df42a2d36; 5.7.0: dbed531733263bba
QOS_GLOBAL_HASHES = ("615bea7df42a2d36", "dbed531733263bba")


def test_qos_global_is_the_one_static_prefetch_queue_mirrors():
    digest = _source_hash("celery", "celery/worker/consumer/tasks.py", "Tasks.qos_global")
    assert digest is not None, ("celery: Tasks.qos_global is gone; "
                                "celery_batched._internals.worker.static_prefetch_queue mirrors it")
    assert digest in QOS_GLOBAL_HASHES, (
        f"celery changed celery/worker/consumer/tasks.py:Tasks.qos_global (source hash {digest}, "
        f"known {QOS_GLOBAL_HASHES}). celery_batched._internals.worker.static_prefetch_queue "
        f"mirrors it (when batching's prefetch share must be set once, before consuming): diff "
        f"the function against the last known release, update the mirror if its behaviour "
        f"changed, then add {digest!r} to QOS_GLOBAL_HASHES.")


@pytest.mark.parametrize("recorded", [False, True], ids=["celery-5.6", "celery-5.7-records-it"])
@pytest.mark.parametrize("detect", [True, False], ids=["detect", "no-detect"])
@pytest.mark.parametrize("quorum", [True, False], ids=["quorum", "classic"])
@pytest.mark.parametrize("driver, spec_semantics",
                         [("amqp", False), ("amqp", True), ("redis", True)],
                         ids=["rabbitmq", "amqp-spec-semantics", "redis"])
def test_static_prefetch_queue_agrees_with_tasks_qos_global(driver, spec_semantics, quorum,
                                                            detect, recorded):
    """Static prefetch (RabbitMQ applies ``basic.qos`` per consumer, to consumers started after
    it) exactly where Celery's own decision is ``global=False`` on RabbitMQ's semantics."""
    from types import SimpleNamespace

    from celery import Celery
    from celery.worker.consumer.tasks import Tasks
    from kombu import Queue

    from celery_batched._internals.worker import static_prefetch_queue

    app = Celery("pin", set_as_current=False)
    app.conf.worker_detect_quorum_queues = detect
    app.conf.task_queues = [Queue("classic"), Queue(
        "qq", queue_arguments={"x-queue-type": "quorum"} if quorum else None)]
    connection = SimpleNamespace(transport=SimpleNamespace(driver_type=driver),
                                 qos_semantics_matches_spec=spec_semantics)
    consumer = SimpleNamespace(app=app, connection=connection)
    qos_global = Tasks.qos_global(None, consumer)
    if recorded:
        consumer.qos_global = qos_global  # what Celery 5.7's Tasks.start records
    static = driver == "amqp" and not spec_semantics and not qos_global
    assert static_prefetch_queue(consumer) == ("qq" if static else None)
    assert static == (driver == "amqp" and not spec_semantics and quorum and detect)
