#!/usr/bin/env bash
# Build local stand-ins for the two official images compose.yaml and the Dockerfile start from,
# for machines that reach no container registry (CI here). Idempotent: an image that exists is
# kept; `--force` rebuilds them.
#
#   fedmq-standin/python:3.11-slim        for python:3.11-slim: Debian bookworm's Python 3.11
#       with pip, plus torch and torchvision at pyproject.toml's pins already installed (they
#       come from this machine's pip configuration: its wheel folders and package index), so
#       the Dockerfile's torch step finds them satisfied instead of asking the PyTorch index,
#       which is out of reach here. This machine's CA bundle is pip's `cert` (PIP_CERT) in it,
#       so the Dockerfile's other pip steps reach the package registry as on any Docker host.
#   fedmq-standin/rabbitmq:3.10-management  for rabbitmq:4.x-management: Debian's RabbitMQ
#       (3.10.8) with the management plugin, laid out like the official image (configuration
#       from /etc/rabbitmq/conf.d, data in /var/lib/rabbitmq, guest allowed off loopback,
#       logs on the console).
#
# The tests pass them to compose through variables a user never sets (PYTHON_BASE_IMAGE,
# BROKER_IMAGE); compose.yaml and the Dockerfile stay what a user runs.
#
# Needs: a running Docker engine, debootstrap, pip, root. Measured on this 2-core machine while
# other work loaded it: 7 minutes from nothing (debootstrap and the torch wheels dominate), 1 s
# when the images exist.
set -euo pipefail

PYTHON_STANDIN="${PYTHON_STANDIN:-fedmq-standin/python:3.11-slim}"
BROKER_STANDIN="${BROKER_STANDIN:-fedmq-standin/rabbitmq:3.10-management}"
BASE_STANDIN="fedmq-standin/debian:bookworm-python3"
SUITE=bookworm
WORK="${FEDMQ_STANDIN_WORK:-/var/tmp/fedmq-standin}"
REPO="$(cd "$(dirname "$0")/../.." && pwd)"

force=false
[[ "${1:-}" == "--force" ]] && force=true

say() { echo "standin: $*" >&2; }
have_image() { ! $force && docker image inspect "$1" >/dev/null 2>&1; }

# The Debian mirror apt on this machine is configured with (deb822 or one-line sources).
debian_mirror() {
  local uri
  uri="$(grep -hoE '^URIs: *http[^ ]*/debian/?$' /etc/apt/sources.list.d/*.sources 2>/dev/null | head -1 | awk '{print $2}')"
  [[ -z "$uri" ]] && uri="$(grep -hoE '^deb +http[^ ]*/debian/? ' /etc/apt/sources.list 2>/dev/null | head -1 | awk '{print $2}')"
  echo "${uri:-http://deb.debian.org/debian}"
}

# The CA bundle pip is configured with on this machine (`pip config list`: cert), else Debian's.
ca_bundle() {
  local cert
  cert="$(pip config list 2>/dev/null | sed -nE "s/^(global|:env:)\.cert='(.*)'$/\2/p" | head -1)"
  echo "${cert:-/etc/ssl/certs/ca-certificates.crt}"
}

# Torch and torchvision exactly as pyproject.toml pins them ("torch==x torchvision==y").
torch_pins() {
  python3 - "$REPO/pyproject.toml" <<'PY'
import sys, tomllib
deps = tomllib.load(open(sys.argv[1], "rb"))["project"]["dependencies"]
print(" ".join(d for d in deps if d.split("==")[0].strip() in ("torch", "torchvision")))
PY
}

# A root file system imported as an image, with Dockerfile instructions (ENV, CMD) applied.
import_rootfs() {  # ROOT NAME INSTRUCTION...
  local root="$1" name="$2"; shift 2
  local changes=() c
  for c in "$@"; do changes+=(-c "$c"); done
  tar -C "$root" --numeric-owner -c . | docker import "${changes[@]}" - "$name" >/dev/null
}

# One debootstrap serves both stand-ins: its root file system becomes the base image (the
# broker's stand-in builds on it), then gets torch and becomes the Python stand-in.
debootstrap_root() {  # ROOT
  local root="$1"
  rm -rf "$root"
  mkdir -p "$root" "$WORK/debs"
  debootstrap --variant=minbase --cache-dir="$WORK/debs" --include=python3,python3-pip,python3-venv,ca-certificates \
    "$SUITE" "$root" "$(debian_mirror)" >"$root.log" 2>&1 || { tail -20 "$root.log" >&2; return 1; }
  rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
  cp "$(ca_bundle)" "$root/etc/ssl/certs/ca-certificates.crt"
  # Like the official Python image: `python` and `pip` exist and pip installs system-wide as root.
  ln -sf /usr/bin/python3 "$root/usr/local/bin/python"
  ln -sf /usr/bin/pip3 "$root/usr/local/bin/pip"
  rm -f "$root"/usr/lib/python3.*/EXTERNALLY-MANAGED
}

build_python_images() {
  local root="$WORK/rootfs" site="$WORK/torch-site" pins pip_pid=""
  if ! have_image "$PYTHON_STANDIN"; then
    # torch's wheels unpack (CPU, disk) while debootstrap downloads (network): in parallel.
    # Debian's python3 reads /usr/local/lib/python3.11/dist-packages; this machine's pip (its
    # wheel folders and index) fills it with the cp311 wheels of the pinned torch.
    pins="$(torch_pins)"
    say "pip: $pins (cp311 wheels) for $PYTHON_STANDIN"
    rm -rf "$site"
    # shellcheck disable=SC2086
    pip install --quiet --no-warn-script-location --target "$site" $pins \
      2> >(grep -v -e "is ignored: it is neither" -e "Running pip as the 'root' user" >&2) &
    pip_pid=$!
  fi
  if ! have_image "$BASE_STANDIN" || ! have_image "$PYTHON_STANDIN"; then
    say "debootstrap $SUITE (minbase, python3) -> $BASE_STANDIN"
    debootstrap_root "$root"
    import_rootfs "$root" "$BASE_STANDIN" 'ENV LANG=C.UTF-8' 'CMD ["bash"]'
  fi
  if [[ -n "$pip_pid" ]]; then
    wait "$pip_pid" || { say "pip install of $pins failed"; return 1; }
    rm -rf "$site/bin"
    mkdir -p "$root/usr/local/lib/python3.11"
    rm -rf "$root/usr/local/lib/python3.11/dist-packages"
    mv "$site" "$root/usr/local/lib/python3.11/dist-packages"
    say "$BASE_STANDIN + $pins -> $PYTHON_STANDIN"
    import_rootfs "$root" "$PYTHON_STANDIN" 'ENV LANG=C.UTF-8' \
      'ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt' 'ENV PIP_DISABLE_PIP_VERSION_CHECK=1' 'CMD ["python3"]'
  fi
  rm -rf "$root" "$site"
}

build_broker_image() {
  have_image "$BROKER_STANDIN" && return 0
  say "$BASE_STANDIN + Debian's rabbitmq-server + management -> $BROKER_STANDIN"
  local context="$WORK/broker-context"
  rm -rf "$context" && mkdir -p "$context"
  cat >"$context/Dockerfile" <<DOCKERFILE
FROM $BASE_STANDIN
RUN apt-get update -qq \\
 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends rabbitmq-server \\
 && rm -rf /var/lib/apt/lists/* /var/cache/apt/archives/*.deb \\
 && rabbitmq-plugins enable --offline rabbitmq_management \\
 && rm -f /etc/rabbitmq/rabbitmq-env.conf \\
 && mkdir -p /etc/rabbitmq/conf.d \\
 && printf 'loopback_users.guest = false\\nlog.console = true\\n' > /etc/rabbitmq/conf.d/10-defaults.conf \\
 && chown -R rabbitmq:rabbitmq /etc/rabbitmq /var/lib/rabbitmq
ENV RABBITMQ_CONFIG_FILES=/etc/rabbitmq/conf.d RABBITMQ_LOGS=-
EXPOSE 5672 15672
CMD ["rabbitmq-server"]
DOCKERFILE
  # (The 28.x client's notice about the legacy builder is noise here: Debian's engine has no buildx.)
  docker build -q -t "$BROKER_STANDIN" "$context" >/dev/null \
    2> >(grep -v -e "DEPRECATED: The legacy builder" -e "Install the buildx component" -e "docs.docker.com/go/buildx" \
           -e '^ *$' >&2)
  rm -rf "$context"
}

command -v docker >/dev/null || { say "no docker client"; exit 1; }
docker info >/dev/null 2>&1 || { say "no Docker engine answers"; exit 1; }
started=$SECONDS
if ! have_image "$PYTHON_STANDIN" || ! have_image "$BROKER_STANDIN"; then
  command -v debootstrap >/dev/null || { say "debootstrap is missing (apt-get install debootstrap)"; exit 1; }
  mkdir -p "$WORK"
fi
build_python_images
build_broker_image
say "ready in $((SECONDS - started)) s: $PYTHON_STANDIN, $BROKER_STANDIN"
