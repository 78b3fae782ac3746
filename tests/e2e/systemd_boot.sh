#!/bin/bash
# Boot a private systemd as PID 1 of fresh PID and mount namespaces, for tests.
# Run as: unshare --fork --pid --mount --mount-proc --uts systemd_boot.sh UNIT_DIR TARGET KEEP_DIR [OVERLAY_DIR]
# The tmpfs mounts are essential: without them systemd's boot-time clean-up
# would empty the real /tmp of the whole machine. /etc is left untouched.
# KEEP_DIR (the checkout: units, venv, spools) stays visible at its own path
# even when it lies under one of the covered directories, e.g. a clone in /tmp.
# With OVERLAY_DIR, /usr, /etc, /opt and /var/spool are overlays whose changes go to OVERLAY_DIR
# (what `make install` writes, users it adds, the spool it makes), and systemd also loads the
# units installed there: an install test that leaves the machine untouched.
set -euo pipefail
unit_dir=$1 target=$2 keep=$3 overlay=${4:-}
mount --make-rprivate /
if [ -n "$overlay" ]; then
    for d in /usr /etc /opt /var/spool; do
        mkdir -p "$d" "$overlay$d/upper" "$overlay$d/work"
        mount -t overlay overlay -o "lowerdir=$d,upperdir=$overlay$d/upper,workdir=$overlay$d/work" "$d"
    done
    unit_dir="$unit_dir:"  # a trailing colon appends systemd's own unit directories
fi
mount -t tmpfs -o mode=0755 tmpfs /run
mkdir /run/spoold-keep
mount --bind "$keep" /run/spoold-keep
for d in /tmp /var/tmp /var/log /var/lib /var/cache; do
    mount -t tmpfs -o mode=0755 tmpfs "$d"
    case "$keep/" in
        "$d"/*) mkdir -p "$keep" && mount --bind /run/spoold-keep "$keep" ;;
    esac
done
chmod 1777 /tmp /var/tmp
export SYSTEMD_UNIT_PATH="$unit_dir"
exec /lib/systemd/systemd --system --unit="$target"
