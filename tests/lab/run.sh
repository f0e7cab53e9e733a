#!/bin/bash
# Lab tier runner: boot the User-Mode Linux guest with this checkout shared
# read-write, run pytest on tests/lab inside it, power it off.
#
#   bash tests/lab/run.sh [PYTEST ARGS...]
#       bash tests/lab/run.sh -k sanlock
#       bash tests/lab/run.sh tests/lab/test_lab_smoke.py::test_agent_ping -x
#
# Paths under tests/lab (relative to the checkout or to the current
# directory) replace the default `tests/lab`. Prints pytest's output; exit
# status is pytest's (124: the guest timed out, 125: the guest gave no result).
# The guest is always powered off or killed, and nothing is left on the host.
#
# Environment:
#   LAB_TIMEOUT=SEC   kill the guest after SEC seconds (default 1200)
#   LAB_LOG_DIR=DIR   daemon logs (tgtd, iscsid, multipathd, nfs, sanlock) go to
#                     host directory DIR (created; default: guest /tmp, lost)
#   LAB_VM_DEBUG=1    guest init progress and kernel log
#   LAB_VM_SHELL=1    interactive: pytest reads the terminal (--pdb works, with
#                     the services still up), then a root shell in the guest
#   LAB_VM_MEM=SIZE   guest memory (default 2G)
#   CI=true           passed through: a missing prerequisite or a skip fails
set -u
T0=$(date +%s.%N)
ROOT=$(cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/../.." && pwd -P)
CALLER_PWD=$(pwd -P)
cd "$ROOT" || exit 2

bash tests/lab/vm/install.sh -q || exit 2
[ -x .venv/bin/python ] || { echo "lab: $ROOT/.venv missing; run 'make venv'" >&2; exit 2; }
# data the tests write, made here in seconds rather than in the guest
.venv/bin/python -m tests.lab.labdata || exit 2

# pytest arguments naming something under tests/lab become checkout-relative
args=()
have_path=0
for a in "$@"; do
    if [[ $a != -* ]]; then
        p=${a%%::*}
        for base in "$CALLER_PWD" "$ROOT"; do
            [[ $p == /* ]] && abs=$(readlink -m "$p") || abs=$(readlink -m "$base/$p")
            if [ -e "$abs" ] && [[ $abs == "$ROOT/tests/lab" || $abs == "$ROOT/tests/lab/"* ]]
            then
                a=${abs#"$ROOT"/}${a:${#p}}
                have_path=1
                break
            fi
        done
    fi
    args+=("$a")
done
[ $have_path = 1 ] || args=(tests/lab "${args[@]}")

VMARGS=(--timeout "${LAB_TIMEOUT:-1200}")
if [ -n "${LAB_LOG_DIR:-}" ]; then
    mkdir -p "$LAB_LOG_DIR" || exit 2
    LAB_LOG_DIR=$(cd "$LAB_LOG_DIR" && pwd -P)
    export LAB_LOG_DIR
    VMARGS+=(--rw "$LAB_LOG_DIR")
fi
export LAB_GUEST=1 LAB_RUN_T0=$T0
# the guest command: note when it starts (the boot cost), then pytest
CMD="export LAB_CMD_T0=\$(date +%s.%N); exec .venv/bin/python -m pytest -p no:cacheprovider"
CMD+=$(printf ' %q' "${args[@]}")
echo "lab: booting the guest: pytest ${args[*]}"
# in the background, so that a SIGTERM/SIGINT/SIGHUP sent to this script
# alone reaches vm-run.sh, which then stops the guest and cleans up; only an
# interactive run hands it our stdin (a background job gets /dev/null)
STDIN=/dev/null
[ -n "${LAB_VM_SHELL:-}" ] && STDIN=/dev/stdin
tests/lab/vm/vm-run.sh "${VMARGS[@]}" -- "$CMD" < "$STDIN" &
VMRUN=$!
trap 'kill -TERM "$VMRUN" 2>/dev/null' INT TERM HUP
wait "$VMRUN"
rc=$?
while kill -0 "$VMRUN" 2>/dev/null; do   # interrupted: wait for its clean-up
    wait "$VMRUN"
    rc=$?
done
echo "lab: exit status $rc, $(awk -v a="$T0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }') s in all (boot, tests, power-off)"
exit $rc
