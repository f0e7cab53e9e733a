#!/bin/bash
# PID 1 inside the User-Mode Linux guest started by tests/lab/vm/vm-run.sh.
# Root is the host's / over hostfs, read-only. /etc /var /root /usr/lib get
# copy-on-write overlays (tmpfs upper, lost at exit); /tmp /run /srv /mnt
# /media are private empty tmpfs; the directories listed in $lab_dir/rwdirs
# are mounted read-write (hostfs), shared with the host.
# Kernel cmdline gives lab_dir=<host dir holding cmd.sh, env, cwd, rwdirs>;
# it is mounted (hostfs, rw) at /run/lab, and the command's exit status is
# written to /run/lab/rc. lab_shell=1: the command reads the console, and an
# interactive bash runs on it afterwards.
# Process creation is expensive under UML: static busybox is used for the
# many small steps here (no dynamic loading over hostfs).
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/root LANG=C.UTF-8
T=/run/lab
B=/bin/busybox
LAB_VM_DEBUG=${lab_debug:-}
exec </dev/null
$B stty -F /dev/console -onlcr 2>/dev/null
$B stty -F /dev/tty1 -onlcr 2>/dev/null
exec 1>/dev/console 2>/dev/tty1
up() { read -r u _ </proc/uptime; echo "$u"; }
dbg() { [ -n "$LAB_VM_DEBUG" ] && echo "[lab-init $(up)] $*" >&2; return 0; }

$B mount -t proc proc /proc
dbg "start"
$B mount -t sysfs sysfs /sys
$B mount -t devtmpfs devtmpfs /dev 2>/dev/null   # normally already mounted (DEVTMPFS_MOUNT)
$B mkdir -p /dev/pts /dev/shm
$B ln -sfn /proc/self/fd /dev/fd; $B ln -sfn /proc/self/fd/0 /dev/stdin
$B ln -sfn /proc/self/fd/1 /dev/stdout; $B ln -sfn /proc/self/fd/2 /dev/stderr
$B mount -t devpts -o gid=5,mode=620,ptmxmode=666 devpts /dev/pts
$B mount -t tmpfs tmpfs /dev/shm
$B mount -t tmpfs -o mode=755 tmpfs /run
$B mkdir -p $T /run/lock /run/ov && $B mount -t hostfs -o "$lab_dir" hostfs $T
$B mount -t tmpfs -o mode=1777 tmpfs /tmp
for d in /srv /mnt /media; do [ -d $d ] && $B mount -t tmpfs tmpfs $d; done
KVER=$($B uname -r)
MODS=/usr/lib/uml/modules
# overlayfs first, by path: modprobe cannot find anything yet
$B insmod $MODS/$KVER/kernel/fs/overlayfs/overlay.ko 2>/dev/null
# writable copy-on-write views of host dirs (upper layer on tmpfs, lost at exit)
for d in /etc /var /root /usr/lib; do
    n=${d//\//_}
    $B mkdir -p /run/ov/$n/u /run/ov/$n/w
    # the UML kernel's modules: /lib/modules (= /usr/lib/modules on a merged-/usr
    # Debian) may not exist on the host and cannot be created on the read-only
    # root, so the /usr/lib overlay gets a "modules" link to them
    [ $d = /usr/lib ] && $B ln -s uml/modules /run/ov/$n/u/modules
    $B mount -t overlay -o lowerdir=$d,upperdir=/run/ov/$n/u,workdir=/run/ov/$n/w overlay $d \
        2>/dev/null && continue
    [ $d = /usr/lib ] && { echo "lab-init: overlay failed on $d: no kernel modules" >&2; continue; }
    echo "lab-init: overlay failed on $d, using empty tmpfs" >&2; $B mount -t tmpfs tmpfs $d
done
[ -L /var/run ] || { $B rm -rf /var/run; $B ln -s /run /var/run; }
[ -L /var/lock ] || { $B rm -rf /var/lock; $B ln -s /run/lock /var/lock; }
modprobe -a configfs loop 2>/dev/null
$B mount -t configfs configfs /sys/kernel/config 2>/dev/null
dbg "overlays done, modules from $($B readlink -f /lib/modules/$KVER)"
# host directories shared read-write
while read -r d; do
    [ -n "$d" ] || continue
    $B mkdir -p "$d" 2>/dev/null   # e.g. under the guest's private /tmp
    $B mount -t hostfs -o "$d" hostfs "$d" && dbg "rw $d"
done < "$T/rwdirs"
$B hostname lab-vm
$B ip link set lo up
# udevd: needed for /dev/<vg>/<lv> and /dev/mapper nodes (LVM waits for udev)
# and for multipathd. No coldplug trigger (slow under UML): devices created
# from now on (loop, dm, sd) get their events processed.
if [ "${lab_udev:-1}" = 1 ]; then
    /lib/systemd/systemd-udevd --daemon >/dev/null 2>&1 && dbg "udevd started"
fi
dbg "init done"
[ -f "$T/env" ] && . "$T/env"
cd "$(cat "$T/cwd")" 2>/dev/null || cd /
if [ "${lab_shell:-0}" = 1 ]; then
    # interactive run: the command reads the console too (e.g. pytest --pdb)
    $B stty -F /dev/console onlcr sane 2>/dev/null
    bash "$T/cmd.sh" </dev/console
else
    bash "$T/cmd.sh"
fi
rc=$?
echo $rc > "$T/rc"
$B sync
dbg "command rc=$rc"
if [ "${lab_shell:-0}" = 1 ]; then
    echo "lab-init: command exited with rc=$rc; guest shell (exit or Ctrl-D powers off)" >/dev/console
    # a session with the console as controlling terminal, so job control works
    $B setsid -c bash -i </dev/console >/dev/console 2>&1
fi
exec $B poweroff -f
