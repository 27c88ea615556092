#!/usr/bin/env bash
# vhost-user-blk with a libblkio client (blkio_load) against qsd and
# qemu-storage-daemon; see vhost_blkio.py --help.
set -euo pipefail
exec python3 "$(dirname "$0")/vhost_blkio.py" "$@"
