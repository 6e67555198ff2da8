"""Streams, consumers and buckets as nats-py configurations (from the
pure specs in ``proto/streams.py``), and the retry of a provisioning step
while JetStream elects a leader or its store races."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import nats.js.errors
import structlog
from nats.js import api

from proto.streams import BucketSpec, ConsumerSpec, StreamSpec

from .errors import TRANSIENT

log = structlog.get_logger("baton.bus")

_STORE_RACE_ERR = 10049  # "error creating store for stream": transient, retry
_STORE_RACE_ATTEMPTS = 8
_STREAM_EXISTS_ERR = 10058  # "stream name already in use with a different configuration"
# "no suitable peers for placement": a cluster peer is still starting (or
# restarting); it comes back, so provisioning waits for it like an election.
_NO_PEERS_ERR = 10005


def _stream_config(spec: StreamSpec, replicas: int) -> api.StreamConfig:
    return api.StreamConfig(
        name=spec.name,
        subjects=list(spec.subjects),
        retention=api.RetentionPolicy.WORK_QUEUE
        if spec.retention == "workqueue"
        else api.RetentionPolicy.LIMITS,
        storage=api.StorageType.FILE,
        duplicate_window=spec.duplicate_window,
        max_age=spec.max_age or None,
        max_msg_size=spec.max_msg_size,
        num_replicas=replicas,
        allow_direct=True,
        description=spec.description or None,
        deny_delete=spec.deny_delete,
        deny_purge=spec.deny_delete,
        placement=api.Placement(tags=list(spec.placement_tags)) if spec.placement_tags else None,
    )


def _bucket_config(spec: BucketSpec, replicas: int, tags: tuple[str, ...] = ()) -> api.StreamConfig:
    """The stream of an erasable bucket: nats-py's own bucket settings except
    that messages may be deleted (which ``create_key_value`` forbids, and a
    stream can never be changed to allow later)."""
    return api.StreamConfig(
        name=spec.stream,
        description=spec.description or None,
        subjects=[spec.subject()],
        allow_direct=True,
        allow_rollup_hdrs=True,
        deny_delete=False,
        discard=api.DiscardPolicy.NEW,
        duplicate_window=min(120.0, spec.ttl) if spec.ttl else 120.0,
        max_age=spec.ttl or None,
        max_msgs_per_subject=spec.history,
        num_replicas=replicas,
        storage=api.StorageType.FILE,
        placement=api.Placement(tags=list(tags)) if tags else None,
    )


def _consumer_config(spec: ConsumerSpec) -> api.ConsumerConfig:
    return api.ConsumerConfig(
        durable_name=spec.durable,
        filter_subject=spec.filter_subject,
        ack_policy=api.AckPolicy.EXPLICIT,
        deliver_policy=api.DeliverPolicy.ALL,
        ack_wait=spec.ack_wait,
        max_deliver=spec.max_deliver,
        max_ack_pending=spec.max_ack_pending,
        description=spec.description or None,
    )


# JetStream briefly without a meta leader (a node restarting, an election):
# provisioning waits for it (TRANSIENT) instead of failing the service's start.
PROVISION_PATIENCE = 60.0  # seconds


async def _retry_store_race(op: Callable[[], Awaitable[Any]]) -> Any:
    """Run the provisioning step ``op`` (the whole step: a create and the
    update or lookup that follows it; or a listing a service starts with),
    again while JetStream is briefly unavailable or its store races."""
    deadline = time.monotonic() + PROVISION_PATIENCE
    attempt = 0
    while True:
        try:
            return await op()
        except TRANSIENT as exc:
            if time.monotonic() > deadline:
                raise
            log.warning("jetstream_unavailable_retrying", error=type(exc).__name__)
            await asyncio.sleep(0.5)
        except nats.js.errors.APIError as exc:
            if exc.err_code == _NO_PEERS_ERR and time.monotonic() <= deadline:
                log.warning("jetstream_peers_offline_retrying", error=exc.description)
                await asyncio.sleep(0.5)
                continue
            attempt += 1
            if exc.err_code != _STORE_RACE_ERR or attempt >= _STORE_RACE_ATTEMPTS:
                raise
            await asyncio.sleep(0.5)
