#!/usr/bin/env bash
# Install what the end-to-end tests and benchmarks need, idempotently.
#
# apt: qemu-utils (qemu-img, qemu-io, qemu-nbd and, on bookworm-backports,
#      qemu-storage-daemon), libnbd-bin (nbdinfo, nbdcopy), python3-libnbd
#      (nbdsh and the `nbd` module for the system python), fio (nbd engine),
#      cryptsetup-bin (checks LUKS headers qsd writes).
# pip: qemu.qmp and pytest for the python3 found on PATH.
#
# Fast path: when every tool and module is already present, nothing is
# downloaded and apt-get update is not run.
set -euo pipefail

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
)
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

echo "setup-test-deps: all test dependencies present"
