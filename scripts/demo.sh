#!/usr/bin/env bash
# Build qsd and run it on an embedded default: a 1 GiB null device and a
# 64 MiB scratch raw image, both exported over NBD on a unix socket, the null
# device also mounted over FUSE as a regular file (when /dev/fuse is usable,
# as root), with a QMP monitor. Ctrl-C stops it (the daemon flushes,
# unmounts and exits cleanly).
set -euo pipefail
cd "$(dirname "$0")/.."

cargo build --release -p qsd

dir=${QSD_DEMO_DIR:-$(mktemp -d -t qsd-demo.XXXXXX)}
img="$dir/scratch.raw"
[ -e "$img" ] || truncate -s 64M "$img"

fuse=()
fuse_msg="  FUSE:        not available (needs /dev/fuse and root)"
if [ -w /dev/fuse ] && [ "$(id -u)" = 0 ]; then
    touch "$dir/null0.img"
    fuse=(--export "fuse,id=fuse-null,node-name=null0,mountpoint=$dir/null0.img")
    fuse_msg="  FUSE:        $dir/null0.img (the null device as a 1 GiB read-only file)"
fi

cat <<MSG
qsd demo in $dir
  NBD socket:  $dir/nbd.sock   exports: 'null0' (1 GiB null-co), 'scratch' (64 MiB raw file, writable)
  QMP socket:  $dir/qmp.sock
$fuse_msg
Try, in another terminal:
  nbdinfo 'nbd+unix:///scratch?socket=$dir/nbd.sock'
  qemu-io -f raw -c 'write -P 0xab 0 1M' -c 'read -P 0xab 0 1M' 'nbd+unix:///scratch?socket=$dir/nbd.sock'
  qemu-img info 'nbd+unix:///null0?socket=$dir/nbd.sock'
  ls -l $dir/null0.img; dd if=$dir/null0.img bs=1M count=4 status=none | od -A d -t x1 | head -3
  echo '{"execute":"qmp_capabilities"} {"execute":"query-block-exports"}' | nc -U -q1 $dir/qmp.sock
Stop with Ctrl-C.
MSG

exec target/release/qsd \
    --blockdev "null-co,node-name=null0,size=1073741824,read-zeroes=on" \
    --blockdev "file,node-name=scratch-file,filename=$img" \
    --blockdev "raw,node-name=scratch,file=scratch-file" \
    --chardev "socket,id=qmp0,path=$dir/qmp.sock,server=on,wait=off" \
    --monitor qmp0 \
    --nbd-server "addr.type=unix,addr.path=$dir/nbd.sock" \
    --export "nbd,id=exp-null,node-name=null0,name=null0" \
    --export "nbd,id=exp-scratch,node-name=scratch,name=scratch,writable=on" \
    "${fuse[@]}"
