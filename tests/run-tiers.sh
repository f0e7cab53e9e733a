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
# Bytecode for the checkout's own modules, written once here: the tiers start
# Python about a thousand times (each kill -9 trial restarts the agent), and
# where PYTHONDONTWRITEBYTECODE is set (as on these machines) each start would
# compile the agent from source again (0.50 against 0.34 CPU-s an agent start).
$BIN/python -m compileall -q agent rpc storage ovfstore tests > /dev/null || exit 2
# The lab tier runs in a single-CPU guest: with TIERS_PARALLEL=1 (make test)
# it runs beside the other tiers, its output shown when it ends.
# Its files are split between three guests: LAB_SECOND and LAB_THIRD list
# the second's and third's shares (about a third of the guest time each),
# the first runs the rest. Three on 2 cores, busy through a run all the
# same: with two, the first guest reached its 1,800 s guard beside the host
# tier and ran alone at the end; with three a run took 23-26 min (session 17).
LAB_SECOND=(test_domains_block_crash_lab.py test_domains_block_volumes_lab.py
            test_ovfstore_lab.py test_sanlock_lab.py test_domains_block_lab.py
            test_faults_lab.py test_errors_lab.py
            test_merge_lab.py test_block_listing_lab.py
            test_vm_access_block_lab.py)
LAB_THIRD=(test_merge_crash_lab.py test_grow_lab.py test_thin_lab.py
           test_thin_crash_lab.py)
lab_pids=()
# (Not with PYTEST_ARGS: a filter may leave one guest nothing to run.)
if [ "${TIERS_PARALLEL:-0}" = 1 ] && [[ " $* " == *" lab "* ]] && [ -z "${PYTEST_ARGS:-}" ]; then
    echo "=================== tier: lab (three guests, in the background) ==================="
    lab_start=$(date +%s)
    first=() second=() third=()
    for f in tests/lab/test_*.py; do
        if [[ " ${LAB_SECOND[*]} " == *" $(basename "$f") "* ]]; then second+=("$f")
        elif [[ " ${LAB_THIRD[*]} " == *" $(basename "$f") "* ]]; then third+=("$f")
        else first+=("$f"); fi
    done
    # each guest's guard: longer than run.sh's default 20 min, the guests
    # share the 2 cores with the host tier
    export LAB_TIMEOUT=${LAB_TIMEOUT:-1800}
    # --durations: each guest's slowest tests in the log, to balance them
    bash tests/lab/run.sh --durations=25 "${first[@]}" > "$LOGDIR/lab1" 2>&1 &
    lab_pids+=($!)
    bash tests/lab/run.sh --durations=25 "${second[@]}" > "$LOGDIR/lab2" 2>&1 &
    lab_pids+=($!)
    bash tests/lab/run.sh --durations=25 "${third[@]}" > "$LOGDIR/lab3" 2>&1 &
    lab_pids+=($!)
    trap 'kill -TERM "${lab_pids[@]}" 2>/dev/null; wait; exit 130' INT TERM
fi
for tier in "$@"; do
    order+=("$tier")
    [ "$tier" = lab ] && [ ${#lab_pids[@]} -gt 0 ] && continue
    echo "=================== tier: $tier ==================="
    start=$(date +%s)
    case $tier in
        unit) $BIN/python -m pytest tests/unit ${PYTEST_ARGS:-} 2>&1 | tee "$LOGDIR/$tier" ;;
        # --durations: the slowest tests in the log, to keep the tier in its budget
        host) $BIN/python -m pytest --durations=30 tests/integration ${PYTEST_ARGS:-} 2>&1 \
                  | tee "$LOGDIR/$tier" ;;
        lab)  bash tests/lab/run.sh ${PYTEST_ARGS:-} 2>&1 | tee "$LOGDIR/$tier" ;;
        *) echo "run-tiers: unknown tier $tier" >&2; exit 2 ;;
    esac
    RC[$tier]=${PIPESTATUS[0]}
    echo "tier $tier took $(( $(date +%s) - start )) s"
done
if [ ${#lab_pids[@]} -gt 0 ]; then
    RC[lab]=0
    for i in "${!lab_pids[@]}"; do
        wait "${lab_pids[$i]}" || RC[lab]=1
        echo "=================== tier: lab, guest $((i + 1)) ==================="
        cat "$LOGDIR/lab$((i + 1))"
    done
    echo "tier lab took $(( $(date +%s) - lab_start )) s (${#lab_pids[@]} guests, beside the others)"
fi
echo "=================== summary ==================="
fail=0
summary() {
    grep -E '(passed|failed|error|no tests ran)' "$1" | grep -E '^=+ .* =+$|^[0-9]+ (passed|failed)' | tail -1
}
for tier in "${order[@]}"; do
    if [ "$tier" = lab ] && [ ${#lab_pids[@]} -gt 0 ]; then
        for i in $(seq ${#lab_pids[@]}); do
            line=$(summary "$LOGDIR/lab$i")
            printf '%-5s rc=%s  guest %s: %s\n' "$tier" "${RC[$tier]}" "$i" "${line:-(no pytest summary)}"
        done
    else
        line=$(summary "$LOGDIR/$tier")
        printf '%-5s rc=%s  %s\n' "$tier" "${RC[$tier]}" "${line:-(no pytest summary)}"
    fi
    [ "${RC[$tier]}" = 0 ] || fail=1
done
exit $fail
