#!/bin/bash
# Boot a private systemd as PID 1 of fresh PID and mount namespaces, for tests.
# Run as: unshare --fork --pid --mount --mount-proc --uts systemd_boot.sh UNIT_DIR TARGET
# The tmpfs mounts are essential: without them systemd's boot-time clean-up
# would empty the real /tmp of the whole machine. /etc is left untouched.
set -euo pipefail
mount --make-rprivate /
for d in /tmp /run /var/tmp /var/log /var/lib /var/cache; do
    mount -t tmpfs -o mode=0755 tmpfs "$d"
done
chmod 1777 /tmp /var/tmp
export SYSTEMD_UNIT_PATH="$1"
exec /lib/systemd/systemd --system --unit="$2"
