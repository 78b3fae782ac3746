#!/bin/bash
# Boot a private systemd as PID 1 of fresh PID and mount namespaces, for tests.
# Run as: unshare --fork --pid --mount --mount-proc --uts systemd_boot.sh UNIT_DIR TARGET KEEP_DIR
# The tmpfs mounts are essential: without them systemd's boot-time clean-up
# would empty the real /tmp of the whole machine. /etc is left untouched.
# KEEP_DIR (the checkout: units, venv, spools) stays visible at its own path
# even when it lies under one of the covered directories, e.g. a clone in /tmp.
set -euo pipefail
unit_dir=$1 target=$2 keep=$3
mount --make-rprivate /
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
