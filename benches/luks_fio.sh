#!/usr/bin/env bash
# fio (nbd engine) on luks and qcow2+luks images, qsd vs qemu-storage-daemon;
# see luks_fio.py --help.
set -euo pipefail
exec python3 "$(dirname "$0")/luks_fio.py" "$@"
