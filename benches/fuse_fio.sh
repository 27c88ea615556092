#!/usr/bin/env bash
# fio (libaio, O_DIRECT) on the file a FUSE export mounts, against qsd and
# qemu-storage-daemon; see fuse_fio.py --help. Needs root and /dev/fuse.
set -euo pipefail
exec python3 "$(dirname "$0")/fuse_fio.py" "$@"
