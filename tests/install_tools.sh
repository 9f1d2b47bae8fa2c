#!/usr/bin/env bash
# Installs the Debian tools the tests drive: swaks (SMTP client, with Perl's SSL modules for
# --tls), fetchmail (POP3 client), Postfix for its smtp-sink (a remote MX with failure
# switches for the outbound tests), Chromium (the admin console in a real browser) and
# OpenLDAP's slapd and ldap-utils (the LDAP address book) and PostgreSQL (the shared
# directory).
# Quiet and best effort: tests that need a missing tool skip with the reason.
set -u
need=()
command -v swaks >/dev/null 2>&1 || need+=(swaks)
# swaks --tls needs Perl's SSL modules.
perl -MNet::SSLeay -e 1 >/dev/null 2>&1 || need+=(libnet-ssleay-perl libio-socket-ssl-perl)
command -v fetchmail >/dev/null 2>&1 || need+=(fetchmail)
command -v smtp-sink >/dev/null 2>&1 || [ -x /usr/sbin/smtp-sink ] || need+=(postfix)
command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 \
  || need+=(chromium)
# A private slapd for the LDAP address book tests, and ldapsearch/ldapadd to check it.
command -v slapd >/dev/null 2>&1 || [ -x /usr/sbin/slapd ] || need+=(slapd)
command -v ldapsearch >/dev/null 2>&1 || need+=(ldap-utils)
# A private PostgreSQL cluster for the shared directory (Debian keeps initdb off PATH).
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null 2>&1 \
  || need+=(postgresql)
[ ${#need[@]} -eq 0 ] && exit 0
if ! command -v apt-get >/dev/null 2>&1 || [ "$(id -u)" != 0 ]; then
  echo "note: cannot install ${need[*]} (no apt-get or not root); those tests will skip"
  exit 0
fi
export DEBIAN_FRONTEND=noninteractive
# Postfix only for its tools: no configuration, and no daemon started on port 25
# (policy-rc.d exit 101 = "do not start services"), removed again afterwards.
echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections \
  2>/dev/null || true
# slapd likewise: no configuration or database of its own (the tests write theirs).
echo "slapd slapd/no_configuration boolean true" | debconf-set-selections 2>/dev/null || true
policy=/usr/sbin/policy-rc.d
made_policy=0
if [ ! -e "$policy" ]; then
  printf '#!/bin/sh\nexit 101\n' > "$policy" && chmod 755 "$policy" && made_policy=1
fi
timeout 300 apt-get update -qq >/dev/null 2>&1 || true
timeout 300 apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null 2>&1 \
  || echo "note: apt-get install ${need[*]} failed; those tests will skip"
[ "$made_policy" = 1 ] && rm -f "$policy"
exit 0
