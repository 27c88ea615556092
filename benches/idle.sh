#!/usr/bin/env bash
# Start-up time and idle RSS of qsd vs qemu-storage-daemon; see idle.py --help.
set -euo pipefail
exec python3 "$(dirname "$0")/idle.py" "$@"
