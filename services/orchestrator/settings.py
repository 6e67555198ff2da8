"""Orchestrator settings (env ``BATON_*``)."""

from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, model_validator

from baton.settings import CommonSettings, parse_tenants

from .limits import TenantLimits
from .pools import Catalogue, CatalogueError, parse_catalogue


class OrchestratorSettings(CommonSettings):
    # Port of the orchestrator's HTTP API.
    http_port: int = 8080
    # The tenants on this bus (comma-separated; each is a NATS account). The
    # orchestrator keeps one task stream per tenant and the tenant's own copy
    # of its events; `baton up` renders the same list into nats-server.
    tenants: str = "acme"
    # Model pool of a step whose agent names none.
    default_pool: str = "default"
    # Price of one GPU-hour per model pool, for cost accounting (USD); a pool
    # the catalogue (BATON_POOLS) lists is priced by its usd_per_gpu_hour.
    gpu_hour_usd: dict[str, float] = Field(default_factory=lambda: {"default": 2.0})
    # The pool catalogue as JSON: {"<pool>": {"model", "max_model_len",
    # "kv_tokens", "max_seqs", "prefill_tps", "decode_tps",
    # "usd_per_gpu_hour", "cold_start_s", "min_replicas", "max_replicas"}}
    # (see docs/scheduling.md). A pool it does not list keeps today's
    # behaviour: its workers decide what fits, priced by BATON_GPU_HOUR_USD.
    pools: dict[str, Any] = Field(default_factory=dict)
    # The same catalogue as a YAML (or JSON) file, under `pools:`; its pools
    # are read first, BATON_POOLS's entries replace them.
    pools_file: Path | None = None
    # Extra workflow files (*.yaml); a name here overrides a built-in one.
    workflows_dir: Path | None = None
    # Cache-aware routing: a session's step goes to the worker that served it
    # last while its heartbeat is fresh and its admitted KV cache is below max_load.
    cache_routing: bool = True
    # Seconds after its last heartbeat a worker stops being a routing target.
    route_stale_after: float = 6.0
    # Admitted KV-cache fraction above which a session's step goes to any worker.
    route_max_load: float = 0.8
    # Pre-warm from the workflow graph: while a step runs, prefill the step
    # that follows it on the worker that will serve it (needs cache_routing).
    prewarm: bool = True
    # Admitted KV-cache fraction above which a worker is not pre-warmed.
    prewarm_max_load: float = 0.5
    # While an input step waits (or a model turn's tool calls are out), warm
    # the step after it (the step itself) again this often (seconds) so its
    # prefix stays in the worker's cache; 0: warm it once (not at all).
    prewarm_keep_every: float = 20.0
    # Predict a step's run time, GPU-seconds and cost from the answer length
    # its agent is learnt to give (this replica's memory of its last 64
    # answers, an upper quantile: the longest while few are known; max_tokens
    # until answer_min_seen are known
    # and never above it); off: from max_tokens. KV-cache need always counts max_tokens.
    learn_answers: bool = True
    # Predict a step's share of its engine from when the steps this replica
    # placed there are predicted to run (a step that outlives them pays the
    # engine alone once they end); off: from their count, as if they shared
    # its whole run.
    share_by_overlap: bool = True
    # Reconcile a pool's counts, read up to an interval ago (a worker's
    # heartbeat, the pool's polled queue), with what this replica knows
    # since: the steps it saw answered after a reading are out of it, and the
    # steps it placed before the queue was read are not counted twice; off:
    # the counts as read.
    reconcile_counts: bool = True
    # Predict a pool's prefill and decode speeds from the steps this replica
    # saw finish (per sequence, against the batch they shared; the speed alone
    # from steps that ran alone until batch sizes spread); off: decode only,
    # once they spread, else the workers' heartbeats (their recent average).
    speeds_from_steps: bool = True
    # Predict a step's prefill by its prompt tokens (a fixed cost + a cost
    # per token, fitted from steps seen alone), the step paying its own
    # prefill's engine time whatever the batch; off: at a prefill speed
    # slowed by the batch, the step paying a share of it.
    prefill_by_tokens: bool = True
    # Expect steps to join a step's batch while it runs, at the rate steps
    # joined the pool's running batches lately (a trickle of tasks; closed
    # waves, each after the last ended, never join); off: only the steps
    # known (placed, taken or waiting in the task stream) share it.
    expect_arrivals: bool = True
    # The quantile of an agent's last answers predicted (nearest rank).
    answer_quantile: float = Field(default=0.8, gt=0.0, le=1.0)
    # Answers of an agent seen before its learnt length is used.
    answer_min_seen: int = Field(default=1, ge=1, le=64)
    # A step is predicted from the answers to prompts within this factor of
    # its own prompt's length (once two are known), else from all its
    # agent's: an agent answers a short note shorter than a long one.
    # 1.0: from all its agent's answers, whatever the prompt.
    answer_prompt_near: float = Field(default=1.5, ge=1.0, le=16.0)
    # A step with no answer after step_timeout is dispatched again, up to
    # step_retries times, then the run fails with step_timeout. Generous by
    # default: a GPU pool scaled to zero needs minutes to wake.
    step_timeout: float = 600.0
    # Dispatches of a timed-out step after the first (see BATON_STEP_TIMEOUT).
    step_retries: int = 1
    # Task messages handled at once (per tenant).
    task_concurrency: int = 256
    # Fair dispatch between tenants counts each tenant's work in flight in
    # "tokens" (prompt + max_tokens of its steps in flight, against its
    # token_share) or, as before, in tasks ("count", against its share).
    fair_policy: Literal["tokens", "count"] = "tokens"
    # Under "tokens": a tenant may hold more than its token_share while other
    # tenants leave theirs idle, as far as the workers' KV cache and sequence
    # slots hold it (from their heartbeats); when another tenant takes work
    # the borrower fetches nothing new until it is back within its
    # allowance (nothing running is stopped). false: each tenant at its share.
    fair_lend: bool = True
    # Seconds between this replica's load beacons (core NATS
    # baton.orchestrators.load.<replica>: the tokens its runs hold). Lending
    # subtracts what the other replicas hold from the pools and splits what
    # is free between the live replicas; one not heard from for three
    # intervals holds nothing.
    replica_load_every: float = Field(default=1.0, gt=0)
    # Every tenant's limits unless BATON_TENANT_LIMITS names it (JSON):
    # token_share = tokens its steps in flight hold (fair dispatch: the rest
    # wait in its stream; share = its tasks running at once under
    # BATON_FAIR_POLICY=count); max_in_flight = tasks accepted and unfinished, running or
    # waiting; tasks_per_second (+ burst) = a token bucket over submission
    # times; tokens_per_minute = tokens its tasks used in the last 60 s. A
    # task over a limit fails with code rate_limited and error.retry_after.
    # 0 = unlimited. Counted per orchestrator replica.
    default_limits: TenantLimits = Field(default_factory=TenantLimits)
    # Per-tenant overrides of BATON_DEFAULT_LIMITS (JSON: tenant -> limits),
    # e.g. {"acme": {"token_share": 32768, "tasks_per_second": 20}}.
    tenant_limits: dict[str, TenantLimits] = Field(default_factory=dict)
    # Step results handled at once.
    result_concurrency: int = 256
    # Seconds between reads of the consumers' backlog (the pending-messages gauge).
    pending_poll_interval: float = 5.0
    # Seconds between checks that the runs this replica counts as in flight
    # were not written by another replica since (baton_steps_in_flight).
    in_flight_check_interval: float = 10.0
    # HTTP: a comment line on every open event stream this often, so proxies
    # keep a stream open while a step waits minutes.
    sse_ping: float = 15.0
    # HTTP: how long (seconds) a request may follow a task.
    follow_timeout: float = 600.0
    # HTTP: the tenant of an OpenAI-API call by an operator key (or with no
    # API keys) that names none (its `tenant` field); unset = the first of
    # BATON_TENANTS.
    default_tenant: str | None = None
    # Test hook, never set in production: the process exits right after
    # storing this step as done, before dispatching what follows it
    # (BATON_TEST_CRASH_AFTER_COMMIT=r1.plan; see tests/test_faults.py).
    test_crash_after_commit: str = ""
    # The MCP servers tool workers connect to (BATON_MCP_SERVERS, the same
    # JSON): workflows may name their tools as mcp.<server>.<tool>.
    mcp_servers: dict[str, dict[str, Any]] = Field(default_factory=dict)
    # Price of one CPU-hour of sandboxed tool time (USD), for cost accounting.
    tool_cpu_hour_usd: float = 0.05
    # The run console (/ui/): how long a browser session lasts (seconds).
    console_session_ttl: float = 8 * 3600.0
    # How long a console login link (`baton console`) stays valid: at most
    # 55 s, inside the audit stream's de-duplication window that makes a link
    # work once.
    console_login_ttl: float = Field(default=45.0, gt=0, le=55)
    # Mark the console's cookie Secure even on plain HTTP (behind a proxy that
    # terminates TLS); over HTTPS it is Secure anyway.
    console_secure_cookie: bool = False

    # The keys of the operator's /v1/tenants API: the tenant-admin bundle of
    # `baton nats-auth` (<dir>/tenant-admin: the operator's and BATON's
    # signing keys, never the operator's own key; compose and Kubernetes
    # mount it, writable, into the orchestrator only) or the data dir of
    # `baton up`; unset: that API is off.
    tenant_admin_dir: Path | None = None

    @model_validator(mode="after")
    def _catalogue_parses(self) -> OrchestratorSettings:
        self.catalogue  # noqa: B018 - a bad catalogue stops the service at start
        return self

    @cached_property
    def catalogue(self) -> Catalogue:
        """The pools: BATON_POOLS_FILE's, then BATON_POOLS's over them.

        Raises:
            CatalogueError: an unreadable file or an entry that cannot be used.
        """
        doc: dict[str, Any] = {}
        if self.pools_file is not None:
            try:
                loaded = yaml.safe_load(self.pools_file.read_text()) or {}
            except (OSError, yaml.YAMLError) as exc:
                raise CatalogueError(f"BATON_POOLS_FILE {self.pools_file}: {exc}") from exc
            if not isinstance(loaded, dict):
                raise CatalogueError(f"BATON_POOLS_FILE {self.pools_file}: not a map")
            doc.update(loaded.get("pools", loaded))
        doc.update(self.pools.get("pools", self.pools))
        return Catalogue(parse_catalogue({"pools": doc}), default_price=dict(self.gpu_hour_usd))

    @property
    def tenant_ids(self) -> list[str]:
        return parse_tenants(self.tenants)

    @property
    def openai_tenant(self) -> str:
        """The tenant of an OpenAI-API call that names none."""
        return self.default_tenant or (self.tenant_ids or ["default"])[0]

    def price(self, pool: str) -> float:
        return self.catalogue.price(pool)
