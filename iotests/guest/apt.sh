# shellcheck shell=bash
# A private apt configuration that adds bookworm-backports without editing
# /etc/apt: its sources list, package lists and download cache live under
# $QSD_GUEST_CACHE/apt. Sourced by build-guest.sh and
# scripts/setup-test-deps.sh.
#
#   guest_apt_update        refresh the private package lists
#   guest_apt ARGS...       apt-get with the private configuration
#   guest_apt_cache ARGS... apt-cache with the private configuration

QSD_GUEST_CACHE=${QSD_GUEST_CACHE:-/var/tmp/qsd-guest}
GUEST_APT_DIR=$QSD_GUEST_CACHE/apt
GUEST_APT_OPTS=(
    -o "Dir::Etc::sourcelist=$GUEST_APT_DIR/sources.list"
    -o "Dir::Etc::sourceparts=-"
    -o "Dir::State::lists=$GUEST_APT_DIR/lists"
    -o "Dir::Cache=$GUEST_APT_DIR/cache"
    -o "Dir::Cache::archives=$GUEST_APT_DIR/archives"
    -o "DPkg::Lock::Timeout=600"
)
# Debian's archive is signed by keys in debian-archive-keyring; the release
# is the one the host runs (qemu-utils 10.0.2 comes from its backports).
GUEST_APT_SUITE=${GUEST_APT_SUITE:-bookworm}

guest_apt_prepare() {
    mkdir -p "$GUEST_APT_DIR"/lists/partial "$GUEST_APT_DIR"/archives/partial \
        "$GUEST_APT_DIR"/cache
    local s=$GUEST_APT_SUITE
    local key=/usr/share/keyrings/debian-archive-keyring.gpg
    cat >"$GUEST_APT_DIR/sources.list.new" <<EOF
deb [signed-by=$key] http://deb.debian.org/debian $s main
deb [signed-by=$key] http://deb.debian.org/debian $s-updates main
deb [signed-by=$key] http://deb.debian.org/debian-security $s-security main
deb [signed-by=$key] http://deb.debian.org/debian $s-backports main
EOF
    mv "$GUEST_APT_DIR/sources.list.new" "$GUEST_APT_DIR/sources.list"
}

guest_apt_update() {
    guest_apt_prepare
    # As root apt drops to the _apt user for downloads, which cannot write
    # into a root-owned cache directory; downloading as root is fine here.
    apt-get "${GUEST_APT_OPTS[@]}" -o APT::Sandbox::User=root update -qq
}

guest_apt() {
    apt-get "${GUEST_APT_OPTS[@]}" -o APT::Sandbox::User=root "$@"
}

guest_apt_cache() {
    apt-cache "${GUEST_APT_OPTS[@]}" "$@"
}
