"""Provisioning: create or update streams, consumers and buckets,
idempotently, from every replica."""

from __future__ import annotations

import json
from collections.abc import Sequence

import nats.js.errors
import structlog
from nats.js import api
from nats.js.kv import KeyValue

from proto.streams import BucketSpec, ConsumerSpec, StreamSpec, placed, region_tags

from .bucket import Bucket
from .config import (
    _STREAM_EXISTS_ERR,
    _bucket_config,
    _consumer_config,
    _retry_store_race,
    _stream_config,
)
from .consume import Consuming

log = structlog.get_logger("baton.bus")


class Provisioning(Consuming):
    """Streams, consumers, buckets (part of ``Bus``)."""

    def _homed(self, spec: StreamSpec) -> StreamSpec:
        """``spec`` placed in the home region unless it has a region of its own."""
        return spec if spec.placement_tags else placed(spec, self.home_region)

    async def ensure_stream(self, spec: StreamSpec) -> None:
        """Create or update the stream (in another account: ``account(prefix).ensure_stream``).
        An existing stream whose placement changed (its tenant's region, the
        home region) is moved there by the update: JetStream moves its replicas."""
        config = _stream_config(self._homed(spec), self.replicas)

        async def add_or_update() -> None:
            try:
                await self._js.add_stream(config)
            except nats.js.errors.BadRequestError as exc:
                if exc.err_code != _STREAM_EXISTS_ERR:
                    raise
                await self._js.update_stream(config)

        await _retry_store_race(add_or_update)

    async def delete_stream(self, name: str) -> bool:
        """Delete the stream, its consumers and its files (a deleted tenant's
        own streams); False when there was none."""
        try:
            await _retry_store_race(lambda: self._js.delete_stream(name))
        except nats.js.errors.NotFoundError:
            return False
        return True

    async def ensure_consumer(self, spec: ConsumerSpec) -> None:
        """Create the durable consumer, or update its mutable fields in place
        (the server keeps its position and pending messages)."""
        config = _consumer_config(spec)
        await _retry_store_race(lambda: self._js.add_consumer(spec.stream, config))

    async def ensure_bucket(self, spec: BucketSpec) -> Bucket:
        """Create the bucket if missing; ``spec.erasable``: with deletes
        allowed on its stream, so replaced revisions can be erased."""
        if spec.erasable:
            kv, erasable = await self._ensure_erasable_bucket(spec)
            return Bucket(self, kv, spec, erasable=erasable)

        async def create() -> KeyValue:
            try:
                made: KeyValue = await self._js.create_key_value(
                    bucket=spec.name,
                    history=spec.history,
                    ttl=spec.ttl or None,
                    replicas=self.replicas,
                    direct=True,
                    description=spec.description or None,
                )
            except nats.js.errors.BadRequestError as exc:
                # Its stream differs from what nats-py asks for (placed in the
                # home region below, which nats-py's create leaves out).
                if exc.err_code != _STREAM_EXISTS_ERR:
                    raise
                made = await self._js.key_value(spec.name)
            await self._home_bucket(spec)
            return made

        plain: KeyValue = await _retry_store_race(create)
        return Bucket(self, plain, spec, erasable=False)

    async def _home_bucket(self, spec: BucketSpec) -> None:
        """Place the bucket's stream in the home region: nats-py's
        ``create_key_value`` has no placement, so its stream is updated right
        after (empty, when just made; an existing one is moved)."""
        tags = list(region_tags(self.home_region))
        if not tags:
            return
        info = await self._js.stream_info(spec.stream)
        if info.config.placement is not None and list(info.config.placement.tags or []) == tags:
            return
        info.config.placement = api.Placement(tags=tags)
        await self._js.update_stream(info.config)
        log.info("bucket_placed", bucket=spec.name, tags=tags)

    async def open_bucket(self, spec: BucketSpec) -> Bucket | None:
        """The bucket if it exists (None if not), without creating it: for
        an identity that may read a bucket but not define it. A service opens
        it as it starts, so JetStream briefly without a leader is waited out
        as provisioning does (a context store restarted during a cluster
        restart exited on its timeout)."""
        try:
            kv: KeyValue = await _retry_store_race(lambda: self._js.key_value(spec.name))
        except nats.js.errors.NotFoundError:
            return None
        return Bucket(self, kv, spec, erasable=False)

    async def stream_names(self, subject: str) -> list[str]:
        """The streams whose subjects overlap ``subject`` (a pattern), every
        page of them (JetStream answers up to 1,024 names a request). nats-py
        has no public call for it (``find_stream_name_by_subject`` keeps the
        first), so it is the plain API request."""
        names: list[str] = []
        while True:
            body = json.dumps({"subject": subject, "offset": len(names)}).encode()
            msg = await self._nc.request(f"{self._api_prefix}.STREAM.NAMES", body, timeout=5.0)
            answer = json.loads(msg.data)
            if "error" in answer:
                raise nats.js.errors.APIError.from_error(answer["error"])
            page = answer.get("streams") or []
            names += page
            if not page or len(names) >= answer.get("total", 0):
                return sorted(names)

    async def _ensure_erasable_bucket(self, spec: BucketSpec) -> tuple[KeyValue, bool]:
        """The bucket's nats-py handle, and whether its stream allows deletes."""
        config = _bucket_config(spec, self.replicas, region_tags(self.home_region))

        async def ensure() -> tuple[KeyValue, bool]:
            erasable = True
            try:
                await self._js.add_stream(config)
            except nats.js.errors.BadRequestError as exc:
                if exc.err_code != _STREAM_EXISTS_ERR:
                    raise
                info = await self._js.stream_info(spec.stream)
                if info.config.deny_delete:
                    # Created before erasure support: deletes can never be allowed
                    # on it. It keeps working; erasure falls back to purges.
                    log.warning("bucket_not_erasable", bucket=spec.name)
                    erasable = False
                else:
                    await self._js.update_stream(config)
            kv: KeyValue = await self._js.key_value(spec.name)
            return kv, erasable

        result: tuple[KeyValue, bool] = await _retry_store_race(ensure)
        return result

    async def provision(
        self,
        streams: Sequence[StreamSpec] = (),
        consumers: Sequence[ConsumerSpec] = (),
    ) -> None:
        """Create or update streams and consumers; safe to call from every replica."""
        for s in streams:
            await self.ensure_stream(s)
        for c in consumers:
            await self.ensure_consumer(c)
