#!/bin/sh
# Install the benchmark peers (Postfix with smtp-sink/smtp-source, Dovecot POP3) from Debian.
# Called by `python -m bench.run` when a peer is missing; safe to run by hand.
# Exit 0 when installed (or already present), 2 when this system cannot install them.
# The packages' own services are stopped and disabled: the driver runs private
# instances on loopback ports from temporary config directories.
set -u

need=""
command -v postfix >/dev/null 2>&1 || [ -x /usr/sbin/postfix ] || need="$need postfix"
[ -x /usr/sbin/dovecot ] && [ -e /usr/lib/dovecot/pop3 ] || need="$need dovecot-core dovecot-pop3d"
if [ -z "$need" ]; then
    echo "install_peers: all peers present"
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "install_peers: apt-get not available; cannot install:$need" >&2
    exit 2
fi
if [ "$(id -u)" != 0 ]; then
    SUDO="sudo -n"
else
    SUDO=""
fi
export DEBIAN_FRONTEND=noninteractive
# Keep the package scripts from starting daemons on ports 25/110 (policy-rc.d 101 = deny).
policy=/usr/sbin/policy-rc.d
made_policy=0
if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' | $SUDO tee "$policy" >/dev/null && $SUDO chmod 755 "$policy" \
        && made_policy=1
fi
cleanup() { [ "$made_policy" = 1 ] && $SUDO rm -f "$policy"; }
trap cleanup EXIT
echo "postfix postfix/main_mailer_type select Local only" | $SUDO debconf-set-selections 2>/dev/null
echo "postfix postfix/mailname string localhost" | $SUDO debconf-set-selections 2>/dev/null
$SUDO apt-get update -qq || { echo "install_peers: apt-get update failed" >&2; exit 2; }
# shellcheck disable=SC2086
$SUDO apt-get install -y -qq --no-install-recommends $need \
    || { echo "install_peers: apt-get install failed:$need" >&2; exit 2; }
# If the package scripts started a daemon anyway (policy-rc.d not honoured), stop the
# ones this run installed; a Postfix or Dovecot the admin already ran is left alone.
case "$need" in *postfix*)
    if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
        $SUDO systemctl disable --now postfix >/dev/null 2>&1 || true
    fi
    $SUDO /usr/sbin/postfix stop >/dev/null 2>&1 || true ;;
esac
case "$need" in *dovecot*)
    if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
        $SUDO systemctl disable --now dovecot >/dev/null 2>&1 || true
    fi
    $SUDO /usr/sbin/dovecot stop >/dev/null 2>&1 || true ;;
esac
echo "install_peers: installed:$need"
