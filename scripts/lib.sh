#!/usr/bin/env bash
# Shared helpers of scripts/dev and scripts/test. Source it; do not run it.

# Installs what the tests and the dev stack need when missing (Debian/Ubuntu:
# apt-get): redis-server, and iproute2 (`ip`) for the network-namespace tests.
ensure_redis() {
  local missing=()
  command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
  command -v ip >/dev/null 2>&1 || missing+=(iproute2)
  if [ ${#missing[@]} -eq 0 ]; then
    return 0
  fi
  echo "${missing[*]} not found: installing with apt-get" >&2
  apt_install "${missing[@]}"
  # The package starts a system-wide server on 6379; the scripts start their own.
  command -v redis-server >/dev/null 2>&1
}

# promtool (Prometheus' checker of rules, configs and metrics), for the
# monitoring test: taken from Debian's prometheus package and unpacked into
# target/tools, so nothing is installed or started system-wide.
ensure_promtool() {
  if command -v promtool >/dev/null 2>&1 || [ -x target/tools/promtool ]; then
    return 0
  fi
  echo "promtool not found: unpacking it from Debian's prometheus package into target/tools" >&2
  local tmp
  tmp=$(mktemp -d)
  if ! (cd "$tmp" && apt-get download prometheus >/dev/null 2>&1); then
    local sudo=""
    [ "$(id -u)" -ne 0 ] && sudo="sudo"
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    (cd "$tmp" && apt-get download prometheus >/dev/null)
  fi
  dpkg -x "$tmp"/prometheus_*.deb "$tmp/x"
  mkdir -p target/tools
  cp "$tmp/x/usr/bin/promtool" target/tools/promtool
  rm -rf "$tmp"
}

# Installs Debian packages with apt-get (through sudo when not root), or
# says what to install by hand.
apt_install() {
  local sudo=""
  if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then
      sudo="sudo"
    else
      echo "error: $* missing and this user cannot install packages;" >&2
      echo "       install them (apt-get install -y $*) and run again" >&2
      return 1
    fi
  fi
  if ! command -v apt-get >/dev/null 2>&1; then
    echo "error: $* missing and apt-get is not available; install them and run again" >&2
    return 1
  fi
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

# Prints a free TCP port on 127.0.0.1, preferring $1 when it is free.
free_port() {
  local want="${1:-0}" p
  if [ "$want" != 0 ] && ! (exec 3<>"/dev/tcp/127.0.0.1/$want") 2>/dev/null; then
    echo "$want"
    return 0
  fi
  for _ in $(seq 1 200); do
    p=$((20000 + RANDOM % 30000))
    if ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then
      echo "$p"
      return 0
    fi
  done
  echo "error: no free port found" >&2
  return 1
}
