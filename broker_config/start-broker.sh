#!/bin/sh
# The broker container's entrypoint (compose.yaml): fill the broker users' names and passwords
# from the environment into the definitions template, then start RabbitMQ ("$@").
#
# The template (broker_config/definitions.json, mounted read-only) holds @BROKER_*@ placeholders;
# the rendered file, passwords in plain (RabbitMQ hashes them on import), lives only inside the
# container and is readable only by the broker. Names and passwords are checked first, as
# fedmq.broker_users does, so nothing needs escaping: names are letters, digits, - and _;
# passwords letters, digits and . _ ~ - (they go into a broker URL unencoded).
set -eu

template="${DEFINITIONS_TEMPLATE:-/etc/fedmq/definitions.template.json}"
out="${DEFINITIONS_OUT:-/tmp/fedmq-definitions.json}"

fail() { echo "start-broker: $*" >&2; exit 2; }

check_user() {  # NAME VALUE
  case "$2" in
    "" | *[!A-Za-z0-9_-]*) fail "$1='$2': want 1-64 letters, digits, - or _" ;;
  esac
  [ "${#2}" -le 64 ] || fail "$1: longer than 64 characters"
}

check_password() {  # NAME VALUE
  case "$2" in
    *[!A-Za-z0-9._~-]*) fail "$1: want letters, digits and . _ ~ - only" ;;
  esac
  [ "${#2}" -ge 8 ] && [ "${#2}" -le 128 ] || fail "$1: want 8-128 characters"
}

check_user BROKER_AGGREGATOR_USER "${BROKER_AGGREGATOR_USER:-}"
check_user BROKER_WORKER_USER "${BROKER_WORKER_USER:-}"
check_password BROKER_AGGREGATOR_PASSWORD "${BROKER_AGGREGATOR_PASSWORD:-}"
check_password BROKER_WORKER_PASSWORD "${BROKER_WORKER_PASSWORD:-}"
[ "$BROKER_AGGREGATOR_USER" != "$BROKER_WORKER_USER" ] || fail "the aggregator and the workers need two broker users"

umask 077
# Literal replacement (index/substr, not gsub: no character of a value is special).
awk '
  function put(line, key, value,    i, out) {
    out = ""
    while ((i = index(line, key)) > 0) {
      out = out substr(line, 1, i - 1) value
      line = substr(line, i + length(key))
    }
    return out line
  }
  {
    $0 = put($0, "@BROKER_AGGREGATOR_USER@", ENVIRON["BROKER_AGGREGATOR_USER"])
    $0 = put($0, "@BROKER_AGGREGATOR_PASSWORD@", ENVIRON["BROKER_AGGREGATOR_PASSWORD"])
    $0 = put($0, "@BROKER_WORKER_USER@", ENVIRON["BROKER_WORKER_USER"])
    $0 = put($0, "@BROKER_WORKER_PASSWORD@", ENVIRON["BROKER_WORKER_PASSWORD"])
    print
  }' "$template" >"$out.tmp"
mv "$out.tmp" "$out"
# Started as root, the broker drops to its own user (the stand-in's Debian wrapper, the
# official image's entrypoint): let it read the file.
if [ "$(id -u)" = 0 ] && id rabbitmq >/dev/null 2>&1; then
  chown rabbitmq "$out"
fi
echo "start-broker: broker users $BROKER_AGGREGATOR_USER (aggregator) and $BROKER_WORKER_USER (workers)" >&2

# The official image starts RabbitMQ through its own entrypoint; a plain installation directly.
if command -v docker-entrypoint.sh >/dev/null 2>&1; then
  exec docker-entrypoint.sh "$@"
fi
exec "$@"
