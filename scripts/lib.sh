#!/usr/bin/env bash
# Shared helpers of scripts/dev and scripts/test. Source it; do not run it.

# Installs redis-server when it is not on PATH (Debian/Ubuntu: apt-get).
ensure_redis() {
  if command -v redis-server >/dev/null 2>&1; then
    return 0
  fi
  echo "redis-server not found: installing it with apt-get" >&2
  local sudo=""
  if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then
      sudo="sudo"
    else
      echo "error: redis-server is missing and this user cannot install packages;" >&2
      echo "       install it (apt-get install -y redis-server) and run again" >&2
      return 1
    fi
  fi
  if ! command -v apt-get >/dev/null 2>&1; then
    echo "error: redis-server is missing and apt-get is not available; install Redis >= 6 and run again" >&2
    return 1
  fi
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null
  # The package starts a system-wide server on 6379; the scripts start their own.
  command -v redis-server >/dev/null 2>&1
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
