#!/usr/bin/env bash
# `make compose-up` / `make compose-down`: the compose stack from the images
# `make images` builds (no registry), the CPU worker override (or
# BATON_COMPOSE_WORKER=gpu), keys generated once into $DATA/secrets.env (0600),
# NATS in operator mode as `make up` runs it: `baton nats-auth` writes the
# server's auth.conf, every identity's .creds and the dev tenants' client
# files ($DATA/tenants/<tenant>.url and .creds, 0600) as `make up` does; the
# nkeys stay in $DATA/secrets/nats.json across runs; the orchestrator mounts
# the tenant-admin bundle $DATA/tenant-admin (/v1/tenants). `up` returns once every
# service is healthy and prints how long that took. `down` removes the
# containers, the network, the volumes and the tenants' and operator's files.
#   DATA (BATON_COMPOSE_DATA, default .data/compose), project BATON_COMPOSE_PROJECT
#   (default baton), published ports BATON_COMPOSE_{NATS,NATS_MONITOR,CONTEXT,
#   ORCHESTRATOR,PROMETHEUS}_PORT (defaults 4222 8222 8081 8080 9090),
#   BATON_COMPOSE_BUILD=0 skips `make images`. Tenants: deploy/nats/tenants.
#   PY: a Python with Baton (default .venv/bin/python, then python3).
set -euo pipefail
cd "$(dirname "$0")/../.."
DATA=${BATON_COMPOSE_DATA:-.data/compose}
mkdir -p "$DATA" && chmod 700 "$DATA"
DATA=$(cd "$DATA" && pwd)  # compose mounts files from it: absolute
export BATON_COMPOSE_DATA=$DATA BATON_COMPOSE_GID=${BATON_COMPOSE_GID:-$(id -g)}
PY=${PY:-$([[ -x .venv/bin/python ]] && echo .venv/bin/python || echo python3)}
export COMPOSE_PROJECT_NAME=${BATON_COMPOSE_PROJECT:-baton}
WORKER=${BATON_COMPOSE_WORKER:-cpu}
FILES=(-f deploy/compose/compose.yaml -f "deploy/compose/compose.$WORKER.yaml")
say() { printf 'compose: %s\n' "$*" >&2; }

compose() {
  if docker compose version >/dev/null 2>&1; then docker compose "${FILES[@]}" "$@"
  else docker-compose "${FILES[@]}" "$@"; fi
}

secrets() {
  if [[ ! -s $DATA/secrets.env ]]; then
    local key op
    key=$(python3 -c 'import secrets; print(secrets.token_hex(32))')
    op=$(python3 -c 'import secrets; print(secrets.token_hex(24))')
    umask 077
    printf 'BATON_CONTEXT_KEY=%s\nBATON_API_KEYS='\''{"%s": "*"}'\''\n' "$key" "$op" >"$DATA/secrets.env"
  fi
  set -a
  # shellcheck disable=SC1090,SC1091
  source "$DATA/secrets.env"
  set +a
}

tenants() {  # the tenants NATS provisions: deploy/nats/tenants, as a,b
  sed -e 's/#.*//' -e '/^[[:space:]]*$/d' deploy/nats/tenants | paste -sd, -
}

nats_auth() {  # operator mode, as `baton up` runs it (keys kept in $DATA/secrets/nats.json)
  "$PY" -m baton.cli nats-auth "$DATA" --tenants "$(tenants)" \
    --port "${BATON_COMPOSE_NATS_PORT:-4222}" >/dev/null
  # What the containers read: group-readable, the containers join the group
  # (the tenants' and the operator's .creds stay 0600).
  chmod 640 "$DATA/nats/auth.conf" "$DATA"/secrets/creds/*.creds
  # The orchestrator's tenant-admin bundle: it reads it and writes the
  # tenants it creates there (group-writable directories, setgid: what it
  # writes stays in your group, readable by the next nats-auth).
  find "$DATA/tenant-admin" -type d -exec chmod 2770 {} + -o -type f -exec chmod 640 {} +
}

healthy() {  # every container of the project healthy (or exited 0 when one-shot)
  local ids id status health code
  ids=$(compose ps -q)
  [[ -n $ids ]] || return 1
  for id in $ids; do
    read -r status code health < <(docker inspect \
      -f '{{.State.Status}} {{.State.ExitCode}} {{if .State.Health}}{{.State.Health.Status}}{{end}}' "$id")
    if [[ $status == exited ]]; then
      [[ $code == 0 ]] && continue
      say "container $(docker inspect -f '{{.Name}}' "$id") exited with $code"
      return 2
    fi
    [[ $status == running && $health == healthy ]] || return 1
  done
}

up() {
  secrets
  if [[ ${BATON_COMPOSE_BUILD:-1} != 0 ]]; then
    ONLY="services nats prometheus worker-$WORKER" deploy/docker/images.sh
  fi
  nats_auth
  local t0=$SECONDS rc
  compose up -d --no-build
  while true; do
    rc=0; healthy || rc=$?
    [[ $rc == 0 ]] && break
    if [[ $rc == 2 || $((SECONDS - t0)) -gt ${BATON_COMPOSE_TIMEOUT:-600} ]]; then
      compose ps >&2; compose logs --tail 30 >&2; exit 1
    fi
    sleep 1
  done
  say "healthy after $((SECONDS - t0))s; tenant URLs and .creds in $DATA/tenants/"
  say "orchestrator http://127.0.0.1:${BATON_COMPOSE_ORCHESTRATOR_PORT:-8080}  prometheus http://127.0.0.1:${BATON_COMPOSE_PROMETHEUS_PORT:-9090}"
}

down() {
  secrets
  compose down --volumes --remove-orphans --timeout 30
  rm -rf "$DATA/tenants" "$DATA"/operator.*
}

case ${1:-} in
  up) up ;;
  down) down ;;
  ps|logs|config) cmd=$1; shift; secrets; compose "$cmd" "$@" ;;
  *) echo "usage: $0 up|down|ps|logs|config" >&2; exit 2 ;;
esac
