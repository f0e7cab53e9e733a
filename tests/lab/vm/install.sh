#!/bin/bash
# Prepare the lab tier after the Debian packages are installed (the Makefile's
# deps-test target installs them with tests/install-debs.sh, then runs this).
# No apt here: a missing package is an error that says to run `make deps-test`.
#
#   bash tests/lab/vm/install.sh [-q]
#
# - builds the LD_PRELOAD shim build/fake_rlimit.so (lets the sanlock daemon
#   start on a host without CAP_SYS_RESOURCE; the guest does not need it)
# - builds build/uml_xstate.so, preloaded into linux.uml (UML 6.1 cannot set
#   a tracee's FPU state on hosts with AMX; see shim/uml_xstate.c)
# - links Debian's python3-sanlock module into pylib/, so that
#   PYTHONPATH=tests/lab/vm/pylib makes `import sanlock` work in the project's
#   CPython 3.11 venv without the rest of Debian's dist-packages
# - checks the facts the guest relies on (UML kernel and its modules, static
#   busybox, the tools the fixtures run)
# Idempotent; a second run only checks (well under a second).
set -euo pipefail
VM=$(cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")" && pwd)
ROOT=$(cd "$VM/../../.." && pwd)
QUIET=0
[ "${1:-}" = -q ] && QUIET=1
fail() { echo "lab install: $*" >&2; exit 1; }

PKGS=(user-mode-linux busybox-static lvm2 tgt open-iscsi multipath-tools nfs-kernel-server
      sanlock python3-sanlock qemu-utils qemu-system-common xfsprogs e2fsprogs util-linux gcc
      libc6-dev)
missing=()
for p in "${PKGS[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q '^install ok installed' \
        || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] \
    || fail "missing Debian packages: ${missing[*]}; run 'make deps-test' (as root) first"

# facts the guest relies on
[ -x /usr/bin/linux.uml ] || fail "/usr/bin/linux.uml missing (package user-mode-linux)"
KVER=$(ls /usr/lib/uml/modules 2>/dev/null | sort -V | tail -1)
[ -n "$KVER" ] && [ -s "/usr/lib/uml/modules/$KVER/modules.dep.bin" ] \
    || fail "no UML kernel modules under /usr/lib/uml/modules (package user-mode-linux)"
for m in fs/overlayfs/overlay drivers/md/dm-multipath drivers/scsi/iscsi_tcp fs/nfsd/nfsd \
         drivers/block/loop; do
    [ -f "/usr/lib/uml/modules/$KVER/kernel/$m.ko" ] || fail "UML module $m.ko missing"
done
grep -qx insmod <(/bin/busybox --list 2>/dev/null) \
    || fail "/bin/busybox without insmod: the guest init needs busybox-static"
grep -q 'not a dynamic executable' <(LC_ALL=C ldd /bin/busybox 2>&1 || true) \
    || fail "/bin/busybox is not static (package busybox-static)"
for t in tgtd tgtadm iscsid iscsiadm multipathd multipath lvm sanlock rpc.nfsd exportfs \
         rpc.mountd rpcbind rpc.statd mkfs.ext4 losetup qemu-storage-daemon /lib/udev/scsi_id \
         /lib/systemd/systemd-udevd; do
    command -v "$t" >/dev/null || fail "$t not found"
done
[ -s /etc/iscsi/initiatorname.iscsi ] || fail "/etc/iscsi/initiatorname.iscsi missing (open-iscsi)"

# python binding of sanlock, for a CPython 3.11 (the .so is built for 3.11)
so=$(ls /usr/lib/python3/dist-packages/sanlock.cpython-*.so 2>/dev/null | head -1)
[ -n "$so" ] || fail "sanlock python module missing (package python3-sanlock)"
mkdir -p "$VM/pylib"
[ "$(readlink "$VM/pylib/$(basename "$so")" 2>/dev/null)" = "$so" ] \
    || ln -sfn "$so" "$VM/pylib/$(basename "$so")"
if [ -x "$ROOT/.venv/bin/python" ]; then
    tag=$("$ROOT/.venv/bin/python" -c 'import sys; print("cpython-%d%d" % sys.version_info[:2])')
    case $so in *"$tag"*) ;; *)
        echo "lab install: warning: $(basename "$so") does not match the venv's $tag;" \
             "the lab's sanlock cross-check will fail" >&2 ;;
    esac
fi

# sanlock on the host: without CAP_SYS_RESOURCE the daemon's
# setrlimit(RLIMIT_MEMLOCK) fails and it exits; the shim fakes success
mkdir -p "$VM/build"
if [ ! -s "$VM/build/fake_rlimit.so" ] || [ "$VM/shim/fake_rlimit.c" -nt "$VM/build/fake_rlimit.so" ]
then
    gcc -O2 -Wall -shared -fPIC -o "$VM/build/fake_rlimit.so.tmp" "$VM/shim/fake_rlimit.c" -ldl
    mv "$VM/build/fake_rlimit.so.tmp" "$VM/build/fake_rlimit.so"
fi

# linux.uml on a host with a large XSAVE area (AMX): see shim/uml_xstate.c
if [ ! -s "$VM/build/uml_xstate.so" ] || [ "$VM/shim/uml_xstate.c" -nt "$VM/build/uml_xstate.so" ]
then
    gcc -O2 -Wall -shared -fPIC -o "$VM/build/uml_xstate.so.tmp" "$VM/shim/uml_xstate.c" -ldl
    mv "$VM/build/uml_xstate.so.tmp" "$VM/build/uml_xstate.so"
fi

[ $QUIET = 1 ] || echo "lab install: ok (UML kernel $KVER, $(basename "$so"), build/fake_rlimit.so, build/uml_xstate.so)"
