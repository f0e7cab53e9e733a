#!/bin/bash
# Run the named test tiers (unit, host, lab) one after another, each with its
# own pytest summary, then recap every tier's closing line. Exit non-zero if
# any tier failed. Extra pytest arguments: PYTEST_ARGS="-k name".
set -uo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin
LOGDIR=$(mktemp -d /tmp/hostagent-tiers.XXXXXX)
trap 'rm -rf "$LOGDIR"' EXIT
declare -A RC
order=()
# The lab tier runs in a single-CPU guest: with TIERS_PARALLEL=1 (make test)
# it runs beside the other tiers, its output shown when it ends.
lab_pid=
if [ "${TIERS_PARALLEL:-0}" = 1 ] && [[ " $* " == *" lab "* ]]; then
    echo "=================== tier: lab (in the background) ==================="
    lab_start=$(date +%s)
    bash tests/lab/run.sh ${PYTEST_ARGS:-} > "$LOGDIR/lab" 2>&1 &
    lab_pid=$!
    trap 'kill -TERM "$lab_pid" 2>/dev/null; wait "$lab_pid"; exit 130' INT TERM
fi
for tier in "$@"; do
    order+=("$tier")
    [ "$tier" = lab ] && [ -n "$lab_pid" ] && continue
    echo "=================== tier: $tier ==================="
    start=$(date +%s)
    case $tier in
        unit) $BIN/python -m pytest tests/unit ${PYTEST_ARGS:-} 2>&1 | tee "$LOGDIR/$tier" ;;
        host) $BIN/python -m pytest tests/integration ${PYTEST_ARGS:-} 2>&1 | tee "$LOGDIR/$tier" ;;
        lab)  bash tests/lab/run.sh ${PYTEST_ARGS:-} 2>&1 | tee "$LOGDIR/$tier" ;;
        *) echo "run-tiers: unknown tier $tier" >&2; exit 2 ;;
    esac
    RC[$tier]=${PIPESTATUS[0]}
    echo "tier $tier took $(( $(date +%s) - start )) s"
done
if [ -n "$lab_pid" ]; then
    wait "$lab_pid"
    RC[lab]=$?
    echo "=================== tier: lab ==================="
    cat "$LOGDIR/lab"
    echo "tier lab took $(( $(date +%s) - lab_start )) s (beside the others)"
fi
echo "=================== summary ==================="
fail=0
for tier in "${order[@]}"; do
    line=$(grep -E '(passed|failed|error|no tests ran)' "$LOGDIR/$tier" | grep -E '^=+ .* =+$|^[0-9]+ (passed|failed)' | tail -1)
    printf '%-5s rc=%s  %s\n' "$tier" "${RC[$tier]}" "${line:-(no pytest summary)}"
    [ "${RC[$tier]}" = 0 ] || fail=1
done
exit $fail
