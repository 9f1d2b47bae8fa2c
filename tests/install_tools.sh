#!/usr/bin/env bash
# Installs the Debian clients the tests use (swaks for SMTP, fetchmail for POP3).
# Quiet and best effort: tests that need a missing tool skip with the reason.
set -u
need=()
command -v swaks >/dev/null 2>&1 || need+=(swaks)
command -v fetchmail >/dev/null 2>&1 || need+=(fetchmail)
[ ${#need[@]} -eq 0 ] && exit 0
if ! command -v apt-get >/dev/null 2>&1 || [ "$(id -u)" != 0 ]; then
  echo "note: cannot install ${need[*]} (no apt-get or not root); those tests will skip"
  exit 0
fi
export DEBIAN_FRONTEND=noninteractive
timeout 300 apt-get update -qq >/dev/null 2>&1 || true
timeout 300 apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null 2>&1 \
  || echo "note: apt-get install ${need[*]} failed; those tests will skip"
