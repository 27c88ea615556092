#!/usr/bin/env bash
# Install what the end-to-end tests and benchmarks need, idempotently.
#
# apt: qemu-utils (qemu-img, qemu-io, qemu-nbd and, on bookworm-backports,
#      qemu-storage-daemon), libnbd-bin (nbdinfo, nbdcopy), python3-libnbd
#      (nbdsh and the `nbd` module for the system python), fio (nbd engine),
#      cryptsetup-bin (checks LUKS headers qsd writes), cpio and kmod (to
#      build the test guest).
# apt, from bookworm-backports through a private apt configuration
# (iotests/guest/apt.sh; /etc/apt is not touched): qemu-system-x86 >= 9.2
#      for the real-guest vhost-user-blk tests (matching qemu-utils 10.0).
# pip: qemu.qmp and pytest for the python3 found on PATH.
# The test guest: iotests/guest/build-guest.sh (kernel + busybox initramfs,
#      cached in ${QSD_GUEST_CACHE:-/var/tmp/qsd-guest}).
#
# Fast path: when every tool and module is already present and the guest is
# current, nothing is downloaded and apt-get update is not run.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=../iotests/guest/apt.sh
. "$ROOT/iotests/guest/apt.sh"

APT_TOOLS=(
    # tool:package
    qemu-img:qemu-utils
    qemu-io:qemu-utils
    qemu-nbd:qemu-utils
    qemu-storage-daemon:qemu-utils
    nbdinfo:libnbd-bin
    nbdcopy:libnbd-bin
    nbdsh:python3-libnbd
    fio:fio
    cryptsetup:cryptsetup-bin
    cpio:cpio
    depmod:kmod
)
# The oldest qemu-system-x86_64 the guest tests accept: 9.2 has the chardev
# option reconnect-ms the reconnect test uses.
QEMU_SYSTEM_MIN=9.2
PY_MODULES=(
    # module:pip-package
    qemu.qmp:qemu.qmp
    pytest:pytest
)

PYTHON=${PYTHON:-python3}

missing_pkgs=()
for entry in "${APT_TOOLS[@]}"; do
    tool=${entry%%:*}
    pkg=${entry#*:}
    if ! command -v "$tool" >/dev/null 2>&1; then
        case " ${missing_pkgs[*]-} " in
            *" $pkg "*) ;;
            *) missing_pkgs+=("$pkg") ;;
        esac
    fi
done

if ((${#missing_pkgs[@]})); then
    if [[ $(id -u) -ne 0 ]]; then
        echo "setup-test-deps: missing packages ${missing_pkgs[*]}; run as root" >&2
        exit 1
    fi
    echo "setup-test-deps: installing ${missing_pkgs[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q --no-install-recommends "${missing_pkgs[@]}"
    # qemu-storage-daemon is only in qemu-utils from bookworm-backports on
    # Debian 12; say so clearly instead of failing later in the tests.
    if ! command -v qemu-storage-daemon >/dev/null 2>&1; then
        echo "setup-test-deps: qemu-storage-daemon still missing;" \
            "install qemu-utils from bookworm-backports:" \
            "apt-get install -t bookworm-backports qemu-utils" >&2
    fi
fi

# qemu-system-x86 must come from bookworm-backports: bookworm's 7.2 lacks
# reconnect-ms, and its qemu-system-common conflicts with qemu-utils 10.
qemu_system_ok() {
    command -v qemu-system-x86_64 >/dev/null 2>&1 || return 1
    local ver
    ver=$(qemu-system-x86_64 --version | awk 'NR == 1 { print $4 }')
    [[ $(printf '%s\n' "$QEMU_SYSTEM_MIN" "$ver" | sort -V | head -1) == "$QEMU_SYSTEM_MIN" ]]
}

if ! qemu_system_ok; then
    if [[ $(id -u) -ne 0 ]]; then
        echo "setup-test-deps: qemu-system-x86 >= $QEMU_SYSTEM_MIN missing; run as root" >&2
        exit 1
    fi
    echo "setup-test-deps: installing qemu-system-x86 from $GUEST_APT_SUITE-backports"
    guest_apt_update
    DEBIAN_FRONTEND=noninteractive guest_apt install -y -q --no-install-recommends \
        -t "$GUEST_APT_SUITE-backports" qemu-system-x86 qemu-utils
    if ! qemu_system_ok; then
        echo "setup-test-deps: qemu-system-x86_64 is still missing or older than" \
            "$QEMU_SYSTEM_MIN after the install" >&2
        exit 1
    fi
fi

missing_pip=()
for entry in "${PY_MODULES[@]}"; do
    mod=${entry%%:*}
    pkg=${entry#*:}
    if ! "$PYTHON" -c "import $mod" >/dev/null 2>&1; then
        missing_pip+=("$pkg")
    fi
done

if ((${#missing_pip[@]})); then
    echo "setup-test-deps: pip installing ${missing_pip[*]}"
    if ! "$PYTHON" -m pip --version >/dev/null 2>&1; then
        "$PYTHON" -m ensurepip --upgrade
    fi
    "$PYTHON" -m pip install -q "${missing_pip[@]}"
fi

"$ROOT/iotests/guest/build-guest.sh"

echo "setup-test-deps: all test dependencies present"
