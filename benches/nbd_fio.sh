#!/usr/bin/env bash
# fio (nbd engine) against qsd and qemu-storage-daemon; see nbd_fio.py --help.
set -euo pipefail
exec python3 "$(dirname "$0")/nbd_fio.py" "$@"
