"""Wiring of the orchestrator: streams, consumers, the task intake (one fair,
rate-limited pull loop per tenant), the conductor's other consume loops, the
task eraser's, the backlog gauge and worker-heartbeat tracking."""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path

import structlog

from baton.accounts import TENANT_STREAMS, tenant_api_prefix
from baton.bus import Bus, Consumption
from baton.dlq import MaxDeliveryWatch
from baton.service import Health, ServiceApp
from baton.settings import default_worker_id
from baton.tenants import (
    DELETED,
    TenantKeys,
    TenantState,
    is_bundle,
    read_registry,
    reissue_orchestrator,
)
from baton.urls import split_creds
from proto import streams, subjects
from proto.messages import Heartbeat

from . import metrics as m
from .api import Services, build_app
from .conductor import Conductor
from .erasure import TaskEraser
from .intake import Intake, TenantRoom
from .limits import Limiter
from .poolview import PoolView
from .replicas import ReplicaLoads
from .routing import HeartbeatTracker, Router
from .runs import RunStore
from .settings import OrchestratorSettings
from .workflows import GraphWorkflow, load_dir

log = structlog.get_logger("orchestrator")

BUILTIN_WORKFLOWS = Path(__file__).with_name("workflows")
ADD_RETRY = (0.5, 5.0)  # seconds between tries to serve a new tenant: first, at most
REFRESH_EVERY = 30.0  # seconds: while they fail, re-read the .creds at most this often


async def _watch_backlog(
    bus: Bus,
    settings: OrchestratorSettings,
    hb: HeartbeatTracker,
    view: PoolView,
    tenants: set[str],
    tool_pools: Callable[[], Iterable[str]],
) -> None:
    """Export every consumer's backlog that something scales on (KEDA's
    Prometheus triggers) or schedules by: tasks per tenant, jobs per worker
    pool, tool calls per tool pool."""
    while True:
        pools = {"default", settings.default_pool} | {p for p, _ in hb.last}
        pools |= set(settings.catalogue.pools)
        specs = [streams.task_consumer(t) for t in sorted(tenants)]  # run-time tenants too
        specs.append(streams.ORCHESTRATOR_RESULTS)
        workers = {streams.worker_consumer(p).durable: p for p in pools}
        specs += [streams.worker_consumer(p) for p in sorted(pools)]
        specs += [streams.tool_consumer(p) for p in sorted({"default", *tool_pools()})]
        for spec in specs:
            with contextlib.suppress(Exception):
                pending = await bus.pending(spec)
                m.PENDING.labels(spec.stream, spec.durable).set(pending)
                if spec.durable in workers:  # the scheduler's view of the pool's queue
                    view.polled(workers[spec.durable], pending)
        hb.export()
        await asyncio.sleep(settings.pending_poll_interval)


async def follow_tenants(
    bus: Bus,
    intake: Intake,
    known: set[str],
    add: Callable[[str, str], Awaitable[None]],
    changed: Callable[[], None] = lambda: None,
    keys: TenantKeys | None = None,
    drop: Callable[[str], None] = lambda t: None,
    place: Callable[[str, str], Awaitable[None]] | None = None,
    reissue: Callable[[set[str]], bool] | None = None,
) -> None:
    """Follow the tenant registry (``baton tenant ...``): a new active tenant
    is provisioned (in its region) and served, a suspended one refused new
    tasks (``tenant_suspended``), a deleted one forgotten; a served tenant's
    region is handed to ``place`` (its streams moved when it changed).
    ``reissue``: re-issue this orchestrator's own ``.creds`` for these
    tenants (True when it changed it), when it holds a tenant-admin bundle.
    ``keys``: the HTTP API's keys and suspended tenants (``live_keys``; a
    tenant's registry key accepted once it is served); without, the
    intake's suspended set alone."""
    registry = await bus.ensure_bucket(streams.TENANTS)
    keys = keys or TenantKeys({}, intake.suspended)
    started = time.time()
    listed: set[str] = set()  # every tenant the registry has, not deleted
    adding: dict[str, asyncio.Task[None]] = {}
    latest: dict[str, TenantState] = {}  # a rotation while the tenant is being served

    async def serve(t: str, fresh: bool, region: str) -> None:
        """Provision and serve ``t`` until it is served: its permissions come
        with the orchestrator's re-issued .creds, read at a reconnect, and a
        fault (an election, a cluster restart) may hold NATS longer than any
        fixed number of tries. (A tenant recorded before this process
        connected is in the file it connected with.)"""
        delay, attempt, refreshed = ADD_RETRY[0], 0, -math.inf
        while True:
            try:
                due = attempt and time.monotonic() - refreshed > REFRESH_EVERY
                if reissue is not None and (attempt == 0 or due):
                    # Another replica's bundle may have created it: this
                    # one's .creds is its own to re-issue.
                    fresh = reissue(known | listed | {t}) or fresh
                if fresh or due:
                    refreshed = time.monotonic()
                    await bus.refresh_credentials()
                await add(t, region)
                break
            except Exception as exc:
                attempt += 1
                if attempt % 20 == 0:
                    log.warning("tenant_add_retrying", tenant=t, attempts=attempt, error=repr(exc))
                fresh = False
                await asyncio.sleep(delay)
                delay = min(delay * 2, ADD_RETRY[1])
        keys.apply(latest[t])  # its key accepted once the tenant is served
        log.info("tenant_served", tenant=t, attempts=attempt + 1)

    while True:
        try:
            async for entry in registry.follow(inactive_threshold=30.0):
                if entry.deleted or not entry.value:
                    continue
                entry_state = TenantState.decode(entry.key, entry.value)
                t, state = entry.key, entry_state.state
                latest[t] = entry_state
                keys.apply(entry_state, served=t in known)
                if state == DELETED:
                    listed.discard(t)
                    if (pending := adding.pop(t, None)) is not None:
                        pending.cancel()
                    drop(t)
                    known.discard(t)
                    changed()
                    continue
                listed.add(t)
                if t not in known and (t not in adding or adding[t].done()):
                    adding[t] = asyncio.create_task(
                        serve(t, entry_state.changed_at >= started, entry_state.region)
                    )
                elif t in known and place is not None and entry_state.region:
                    try:
                        await place(t, entry_state.region)
                    except Exception as exc:  # the registry keeps the region: a restart retries
                        log.error("tenant_place_failed", tenant=t, region=entry_state.region,
                                  error=repr(exc))  # fmt: skip
                log.info("tenant_state", tenant=t, state=state)
        except asyncio.CancelledError:
            for task in adding.values():
                task.cancel()
            raise
        except Exception as exc:
            log.warning("tenant_registry_watch_failed", error=repr(exc))
            await asyncio.sleep(2.0)


async def start(bus: Bus, settings: OrchestratorSettings, health: Health) -> ServiceApp:
    """The orchestrator built on its bus (streams, consumers, the runs
    bucket, every collaborator), its HTTP API and its NATS side."""
    specs = load_dir(
        BUILTIN_WORKFLOWS, settings.workflows_dir, mcp_servers=frozenset(settings.mcp_servers)
    )
    workflows = {name: GraphWorkflow(spec) for name, spec in specs.items()}
    # The registry first: a tenant of BATON_TENANTS deleted at run time stays
    # deleted (none of its streams made again), and each tenant's streams are
    # created in its region from the start.
    recorded = await read_registry(bus)
    tenants = []
    for t in settings.tenant_ids:
        if t in recorded and recorded[t].state == DELETED:
            anew = "deleted by `baton tenant delete`; `baton tenant create` makes it anew"
            log.warning("tenant_deleted_skipped", tenant=t, reason=anew)
        else:
            tenants.append(t)
    regions = {t: entry.region for t, entry in recorded.items() if entry.region}
    own = {t: streams.tenant_streams(t, regions.get(t)) for t in tenants}
    # Every pool a step may be placed on has its consumer before any worker
    # of it ever ran: a job sent to a pool at zero is its backlog, which is
    # what wakes the pool (KEDA's lag), and the scheduler's view of it.
    pools = {settings.default_pool, *settings.catalogue.pools}
    pools |= {p for spec in specs.values() for a in spec.agents.values() for p in a.eligible}
    await bus.provision(
        streams=[*streams.ORCHESTRATOR_STREAMS, *(own[t][0] for t in tenants)],
        consumers=[
            *(streams.task_consumer(t) for t in tenants),
            *(streams.input_consumer(t) for t in tenants),
            streams.ORCHESTRATOR_RESULTS,
            streams.ORCHESTRATOR_TIMERS,
            streams.ORCHESTRATOR_ERASURES,
            streams.ORCHESTRATOR_DEAD_TASKS,
            streams.ORCHESTRATOR_TOOL_RESULTS,
            *(streams.worker_consumer(p) for p in sorted(pools)),
        ],
    )
    # Each tenant's own copy of its events and tokens, for replay. A NATS
    # without Baton's accounts (a caller's --nats-url) has no tenant account:
    # its clients live in Baton's account and replay BATON_EVENTS itself.
    if tenants and await bus.reaches_account(tenant_api_prefix(tenants[0])):
        for t in tenants:
            for spec in own[t][1:]:  # its events and tokens
                await bus.account(tenant_api_prefix(t)).ensure_stream(spec)
    elif tenants:
        log.warning("tenant_accounts_unreachable", tenant=tenants[0])
    runs = RunStore(await bus.ensure_bucket(streams.RUNS))
    known = set(tenants)
    placed = {t: regions.get(t, "") for t in tenants}  # the region its streams are placed in

    def copies(tenant: str) -> list[tuple[Bus, str]]:
        """The tenant account's own copies of its events and tokens."""
        if tenant not in known:
            return []
        account = bus.account(tenant_api_prefix(tenant))
        return [(account, name) for name in TENANT_STREAMS]

    eraser = TaskEraser(bus, runs, event_copies=copies)
    hb = HeartbeatTracker()
    router = Router(hb, enabled=settings.cache_routing, stale_after=settings.route_stale_after,
                    max_load=settings.route_max_load)  # fmt: skip
    pool_view = PoolView(settings.catalogue, hb, stale_after=settings.route_stale_after,
                         overlap=settings.share_by_overlap,
                         reconcile_counts=settings.reconcile_counts,
                         speeds_from_steps=settings.speeds_from_steps,
                         prefill_by_tokens=settings.prefill_by_tokens,
                         expect_arrivals=settings.expect_arrivals)  # fmt: skip
    # The fair gate lends idle shares out as far as the live workers hold them.
    lend = pool_view.room if settings.fair_lend else None
    # ... less what the other replicas' runs hold, split between the replicas.
    peers = ReplicaLoads(default_worker_id(), settings.replica_load_every)
    room = TenantRoom(Limiter(settings.default_limits, settings.tenant_limits),
                      settings.fair_policy, lend, peers.view)  # fmt: skip
    # Before the HTTP API answers: a rotated key is refused, a suspended tenant too.
    keys = TenantKeys(settings.api_keys, room.suspended)
    for t, entry in recorded.items():
        keys.apply(entry, served=t in tenants)
    conductor = Conductor(bus, runs, workflows, settings, router, check_limits=room.check,
                          on_changed=room.changed, pools=pool_view)  # fmt: skip
    intake = Intake(bus, conductor, room)
    m.init_series(
        {name: {a: spec.pool for a, spec in wf.agents.items()} for name, wf in workflows.items()},
        tenants,
    )
    await bus.subscribe(f"{subjects.HEARTBEATS}.*.*", Heartbeat, hb.on_heartbeat)
    watched = [
        *(streams.task_consumer(t) for t in tenants),
        streams.ORCHESTRATOR_RESULTS,
        streams.ORCHESTRATOR_TIMERS,
        streams.worker_consumer(settings.default_pool),
    ]
    await MaxDeliveryWatch(bus, [(c.stream, c.durable) for c in watched]).start()
    app = build_app(settings, health, Services(bus, runs, conductor, room, specs, known))
    catalog = await bus.ensure_bucket(streams.TOOL_CATALOG)
    loops: dict[str, list[Consumption]] = {}  # per served tenant

    def start_loops(t: str) -> list[Consumption]:
        """A tenant's task and input loops, recorded so deleting it stops them."""
        loops[t] = [
            intake.run_tenant(streams.task_consumer(t), t, concurrency=settings.task_concurrency),
            bus.consume(streams.input_consumer(t), conductor.on_input, concurrency=4),
        ]
        return loops[t]

    def drop_tenant(t: str) -> None:
        """A deleted tenant: stop pulling its (erased) task stream."""
        stopped = loops.pop(t, [])
        for loop in stopped:
            loop.stop()
        log.info("tenant_loops_stopped", tenant=t, loops=len(stopped))

    async def add_tenant(t: str, region: str) -> None:
        """A tenant created at run time: its streams (in its region) and
        consumers, then its loops."""
        task_stream, *copies = streams.tenant_streams(t, region)
        consumers = [streams.task_consumer(t), streams.input_consumer(t)]
        await bus.provision(streams=[task_stream], consumers=consumers)
        if not await bus.reaches_account(tenant_api_prefix(t)):
            raise RuntimeError(f"tenant {t}'s account is not reachable yet")
        for spec in copies:
            await bus.account(tenant_api_prefix(t)).ensure_stream(spec)
        known.add(t)
        placed[t] = region
        start_loops(t)
        log.info("tenant_added", tenant=t, region=region or None)

    def own_creds() -> Callable[[set[str]], bool] | None:
        """With a tenant-admin bundle, this replica re-issues its own .creds
        for a tenant another replica created (its copy of the bundle is its
        own: a Kubernetes pod's)."""
        admin_dir = settings.tenant_admin_dir
        creds = settings.nats_creds or split_creds(settings.nats_url)[1]
        if admin_dir is None or creds is None or not is_bundle(admin_dir):
            return None
        return lambda ts: reissue_orchestrator(admin_dir, Path(creds), ts)

    async def place_tenant(t: str, region: str) -> None:
        """A served tenant given a region (``baton tenant region``): its
        streams' placement updated, which has JetStream move their replicas
        to the region's servers (data and consumers with them)."""
        if placed.get(t, "") == region:
            return
        task_stream, *copies = streams.tenant_streams(t, region)
        await bus.ensure_stream(task_stream)
        for spec in copies:
            await bus.account(tenant_api_prefix(t)).ensure_stream(spec)
        placed[t] = region
        log.info("tenant_placed", tenant=t, region=region)

    async def run() -> None:
        watcher = asyncio.create_task(
            _watch_backlog(bus, settings, hb, conductor.pools, known, conductor.tools.pools)
        )
        tool_watch = asyncio.create_task(conductor.tools.watch(catalog))
        reconciler = asyncio.create_task(intake.reconcile())
        registry = asyncio.create_task(
            follow_tenants(bus, intake, known, add_tenant, keys=keys,
                           drop=drop_tenant, place=place_tenant, reissue=own_creds())
        )  # fmt: skip
        in_flight = asyncio.create_task(
            conductor.check_in_flight(settings.in_flight_check_interval)
        )
        keep_warm = asyncio.create_task(conductor.warming.keep(settings.prewarm_keep_every))
        beacons = asyncio.create_task(peers.run(bus, room.gate.holding))
        health.ready, health.reason = True, "serving"
        try:
            await asyncio.gather(
                *(loop for t in tenants for loop in start_loops(t)),
                bus.consume(streams.ORCHESTRATOR_TIMERS, conductor.on_timer, concurrency=64),
                bus.consume(streams.ORCHESTRATOR_ERASURES, eraser.on_erasure, concurrency=4),
                bus.consume(streams.ORCHESTRATOR_DEAD_TASKS, conductor.on_dead_task, concurrency=4),
                bus.consume(
                    streams.ORCHESTRATOR_RESULTS,
                    conductor.on_result,
                    concurrency=settings.result_concurrency,
                ),
                bus.consume(
                    streams.ORCHESTRATOR_TOOL_RESULTS,
                    conductor.on_tool_result,
                    concurrency=settings.result_concurrency,
                ),
            )
        finally:
            health.ready, health.reason = False, "stopping"
            watcher.cancel()
            tool_watch.cancel()
            reconciler.cancel()
            in_flight.cancel()
            keep_warm.cancel()
            beacons.cancel()
            registry.cancel()
            for tenant in list(loops):
                drop_tenant(tenant)

    return ServiceApp(app, run)
