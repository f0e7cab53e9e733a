#!/bin/bash
# Install the Debian packages named as arguments, unless all are present.
# Idempotent: when nothing is missing it only asks dpkg (about 0.1 s).
set -euo pipefail
missing=()
for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q '^install ok installed' || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" != 0 ]; then
    echo "install-debs: missing Debian packages: ${missing[*]} (run as root to install them)" >&2
    exit 1
fi
echo "install-debs: apt-get install ${missing[*]}"
apt-get update -q >/dev/null
# policy-rc.d keeps the packages' services from starting on this host: the
# tests start the daemons they need themselves.
printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d; chmod +x /usr/sbin/policy-rc.d
trap 'rm -f /usr/sbin/policy-rc.d' EXIT
DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
    -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold \
    "${missing[@]}" > /tmp/hostagent-apt.log 2>&1 \
    || { tail -20 /tmp/hostagent-apt.log >&2; exit 1; }
