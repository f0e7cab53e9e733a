#!/bin/bash
# Run a command as root inside a throw-away User-Mode Linux guest whose kernel
# has device-mapper, dm-multipath, iscsi_tcp, loop, nfs and nfsd (as modules).
#
#   tests/lab/vm/vm-run.sh [options] [--] 'COMMAND'    (a bash command line)
#   tests/lab/vm/vm-run.sh [options] [--] PROG ARG...  (an exact argv)
#
# The guest sees the host's whole filesystem read-only, with copy-on-write
# overlays on /etc /var /root /usr/lib whose changes vanish at exit, a private
# empty tmpfs on /tmp /srv /mnt /media, and READ-WRITE access to the current
# directory plus every --rw DIR (or $LAB_VM_RWDIRS, colon separated). COMMAND
# runs as root under bash in the current directory with the caller's exported
# environment, stdin /dev/null; its stdout and stderr come back on our
# stdout/stderr; our exit status is COMMAND's (124: timed out, 125: the guest
# gave no result, 130: interrupted).
#
# Options:
#   --rw DIR        also share DIR read-write (repeatable)
#   -m, --mem SIZE  guest memory (default ${LAB_VM_MEM:-2G})
#   --timeout SEC   kill the guest after SEC seconds (default ${LAB_VM_TIMEOUT:-1800}); exit 124
#   --debug         guest init progress on stderr, kernel log on stdout
#                   [env LAB_VM_DEBUG=1]
#   --shell         after COMMAND, run an interactive bash in the guest on our
#                   terminal (exit the shell to power off) [env LAB_VM_SHELL=1]
# Env: LAB_VM_UDEV=0 do not start systemd-udevd in the guest
#
# Whatever happens (failure, timeout, SIGINT/SIGTERM), the guest is powered
# off or killed and its temporary directory removed before we return.
set -u
VM=$(cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")" && pwd)
MEM=${LAB_VM_MEM:-2G}
TIMEOUT=${LAB_VM_TIMEOUT:-1800}
DEBUG=${LAB_VM_DEBUG:-}
SHELL_AFTER=${LAB_VM_SHELL:-}
RW=()
[ -n "${LAB_VM_RWDIRS:-}" ] && IFS=: read -r -a RW <<< "$LAB_VM_RWDIRS"
while [ $# -gt 0 ]; do
    case $1 in
        --rw) RW+=("$2"); shift 2 ;;
        -m|--mem) MEM=$2; shift 2 ;;
        --timeout) TIMEOUT=$2; shift 2 ;;
        --debug) DEBUG=1; shift ;;
        --shell) SHELL_AFTER=1; shift ;;
        --) shift; break ;;
        -h|--help) sed -n '2,/^set -u/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        -*) echo "vm-run.sh: unknown option $1" >&2; exit 2 ;;
        *) break ;;
    esac
done
[ $# -ge 1 ] || { echo "usage: vm-run.sh [options] 'COMMAND'" >&2; exit 2; }
[ "$(id -u)" = 0 ] || { echo "vm-run.sh: must run as root" >&2; exit 2; }
command -v linux.uml >/dev/null || {
    echo "vm-run.sh: linux.uml missing; run 'make deps-test'" >&2; exit 2; }

for d in "$(pwd -P)" "${RW[@]}"; do
    case $(readlink -f "$d") in
        /|/proc|/proc/*|/sys|/sys/*|/dev|/dev/*)
            echo "vm-run.sh: refusing to share $d read-write; cd to a project directory" >&2; exit 2 ;;
    esac
done

T=$(mktemp -d /tmp/lab-vm.XXXXXX)
VMPID= VMPGRP=
cleanup() {
    trap - EXIT
    trap '' INT TERM HUP   # a second signal must not cut the clean-up short
    if [ -n "$VMPID" ]; then
        local target=$VMPID
        [ "$VMPGRP" = 1 ] && target=-$VMPID   # the whole process group
        kill -TERM -- "$target" 2>/dev/null
        for _ in $(seq 50); do kill -0 -- "$target" 2>/dev/null || break; sleep 0.1; done
        kill -KILL -- "$target" 2>/dev/null
        wait "$VMPID" 2>/dev/null
    fi
    # the guest kernel's own pid file (uml_dir=$T umid=uml): should be gone by now
    if [ -s "$T/uml/pid" ]; then
        pid=$(cat "$T/uml/pid")
        [ "$(readlink "/proc/$pid/exe" 2>/dev/null)" = "$(readlink -f "$(command -v linux.uml)")" ] \
            && kill -KILL "$pid" 2>/dev/null
    fi
    [ -n "${STTY_SAVED:-}" ] && stty "$STTY_SAVED" 2>/dev/null
    rm -rf "$T"
}
trap cleanup EXIT
trap 'echo "vm-run.sh: interrupted, stopping the guest" >&2; exit 130' INT TERM HUP

if [ $# = 1 ]; then
    printf '%s\n' "$1" > "$T/cmd.sh"          # one argument: a shell command line
else
    printf '%q ' "$@" > "$T/cmd.sh"; echo >> "$T/cmd.sh"   # several: an exact argv
fi
pwd -P > "$T/cwd"
{ pwd -P; for d in "${RW[@]}"; do [ -n "$d" ] && readlink -f "$d"; done; } > "$T/rwdirs"
# caller's exported environment, minus what belongs to the host shell
for v in $(compgen -e); do
    case $v in
        PWD|OLDPWD|SHLVL|HOSTNAME|_|HOME|TMPDIR|TMP|TEMP|TERM|DISPLAY|SSH_*|XDG_*|LS_COLORS|MAIL|PS1)
            continue ;;
    esac
    printf 'export %s=%q\n' "$v" "${!v}"
done > "$T/env"
# pyenv shims are bash scripts that cost seconds per call under UML: put the
# real interpreter directory just before the shims (an active venv stays first)
if [[ ":$PATH:" == *"/.pyenv/shims:"* ]] && command -v pyenv >/dev/null 2>&1; then
    PYBIN="$(pyenv prefix 2>/dev/null | cut -d: -f1)/bin"
    if [ -x "$PYBIN/python3" ]; then
        NEWPATH= ADDED=
        IFS=: read -r -a PARTS <<< "$PATH"
        for p in "${PARTS[@]}"; do
            if [ -z "$ADDED" ] && [[ $p == */.pyenv/shims || $p == */pyenv-virtualenv/shims ]]; then
                NEWPATH+="$PYBIN:"; ADDED=1
            fi
            NEWPATH+="$p:"
        done
        printf 'export PATH=%q\n' "${NEWPATH%:}" >> "$T/env"
    fi
fi
[ -n "$DEBUG" ] && echo "export LAB_VM_DEBUG=1" >> "$T/env"

# console: each UML console line needs its own input fd. Without --shell the
# guest reads nothing; with it, line 0 is our terminal (UML puts it in raw
# mode, the guest's tty does the line editing).
LAB_SHELL=0
if [ -n "$SHELL_AFTER" ]; then
    if [ -t 0 ]; then
        LAB_SHELL=1; STTY_SAVED=$(stty -g)
        exec 3<&0
    else
        echo "vm-run.sh: --shell needs a terminal on stdin; ignored" >&2
        exec 3</dev/null
    fi
else
    exec 3</dev/null
fi
exec 4</dev/null
if [ $LAB_SHELL = 1 ]; then echo "export TERM=${TERM:-dumb}"; else echo "export TERM=dumb"; fi >> "$T/env"
# LAB_VM_DEBUG also makes the guest kernel chatty
if [ -n "$DEBUG" ]; then KLOG=(loglevel=6 lab_debug=1); else KLOG=(quiet loglevel=0); fi
# shim/uml_xstate.c: UML 6.1 on a host whose XSAVE area is larger than its own
UML=(env LD_PRELOAD="$VM/build/uml_xstate.so" linux.uml mem="$MEM" rootfstype=hostfs rootflags=/ ro init="$VM/guest/uml-init.sh"
     lab_dir="$T" uml_dir="$T" umid=uml lab_udev="${LAB_VM_UDEV:-1}" lab_shell="$LAB_SHELL"
     con0=fd:3,fd:1 con1=fd:4,fd:2 con=null ssl=null "${KLOG[@]}")
# UML keeps guest RAM in a file under TMPDIR: tmpfs, so it is not written to disk
if [ $LAB_SHELL = 1 ]; then
    # the guest reads our terminal: it must stay in our (foreground) process
    # group, so no process group of its own; linux.uml ends its helpers itself
    TMPDIR=/dev/shm timeout --foreground -k 5 "$TIMEOUT" "${UML[@]}" <&0 &
    VMPID=$! VMPGRP=0
else
    # timeout(1) leads its own process group, which holds linux.uml and every
    # host process of the guest
    TMPDIR=/dev/shm timeout -k 5 "$TIMEOUT" "${UML[@]}" &
    VMPID=$! VMPGRP=1
fi
wait "$VMPID"; vmrc=$?
VMPID=
[ -n "${STTY_SAVED:-}" ] && stty "$STTY_SAVED" 2>/dev/null
if [ -s "$T/rc" ]; then
    exit "$(cat "$T/rc")"
fi
[ $vmrc = 124 ] && { echo "vm-run.sh: guest timed out after ${TIMEOUT}s" >&2; exit 124; }
echo "vm-run.sh: guest ended without a result (linux.uml rc=$vmrc)" >&2
exit 125
