#!/usr/bin/env bash
# fio (nbd engine) on qcow2 images against qsd and qemu-storage-daemon; see qcow2_fio.py --help.
set -euo pipefail
exec python3 "$(dirname "$0")/qcow2_fio.py" "$@"
