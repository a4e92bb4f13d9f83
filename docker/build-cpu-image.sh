#!/usr/bin/env bash
# Build clbench's CPU image with podman where there is no Docker daemon and no registry to pull from:
#   docker/build-cpu-image.sh [TAG]          (default localhost/clbench:cpu; needs root, podman, debootstrap)
# Exit code 3: no base image could be made (no debootstrap, not root, no Debian mirror).
# The base image is a Debian bookworm root made with debootstrap and imported once (kept under $BASE_TAG).
# Where pip here reads local wheel folders (/opt/wheels, /opt/pypi, /opt/pypi-more) and a private CA bundle,
# those are bind-mounted into the build and passed as build args; elsewhere nothing of this machine is used.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
tag=${1:-localhost/clbench:cpu}
# BASE_PYTHON: the prefix of a CPython 3.11 built on bookworm (e.g. a pyenv version) copied into the base's
# /usr/local. Debian's own python3 is 3.11.2, older than constraints.txt allows (soupsieve 4.1.2 needs >= 3.11.5);
# python:3.11-slim-bookworm, the Dockerfile's default base, has a current 3.11 and needs none of this.
py=${BASE_PYTHON:-}
if [[ -n $py ]]; then
    pyver=$("$py/bin/python3" -c 'import platform; print(platform.python_version())')
    base=${BASE_TAG:-localhost/clbench-base:bookworm-py$pyver}
else
    base=${BASE_TAG:-localhost/clbench-base:bookworm}
fi
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
ca=${HOST_CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}

stage=base tmpconf="" rootfs=""
finish() {
    local rc=$?
    rm -rf "$tmpconf" "$rootfs"
    if ((rc != 0)) && [[ $stage == base ]]; then
        echo "build-cpu-image.sh: no base image $base could be made" >&2
        rc=3
    fi
    exit "$rc"
}
trap finish EXIT

# podman 4.3's default ulimits make runc/crun fail (setrlimit) in some sandboxes: drop them.
if [[ -z ${CONTAINERS_CONF:-} ]]; then
    tmpconf=$(mktemp --suffix=.conf)
    printf '[containers]\ndefault_ulimits = []\n' >"$tmpconf"
    export CONTAINERS_CONF=$tmpconf
fi

if ! podman image exists "$base"; then
    rootfs=$(mktemp -d)
    if [[ -n $py ]]; then
        pkgs=ca-certificates,libssl3,libffi8,libsqlite3-0,libbz2-1.0,liblzma5,zlib1g,libncursesw6,libreadline8,libuuid1
        debootstrap --variant=minbase --include=$pkgs bookworm "$rootfs" "$mirror"
        mkdir -p "$rootfs/usr/local/lib"
        cp -a "$py/lib/libpython3"* "$rootfs/usr/local/lib/"
        # the standard library only: not the host's site-packages, tests or scripts
        tar -C "$py/lib" --exclude=python3.11/site-packages --exclude=python3.11/test \
            --exclude=__pycache__ -c python3.11 | tar -C "$rootfs/usr/local/lib" -x
        mkdir -p "$rootfs/usr/local/lib/python3.11/site-packages" "$rootfs/usr/local/bin"
        cp -a "$py/bin/python3.11" "$rootfs/usr/local/bin/"
        ln -s python3.11 "$rootfs/usr/local/bin/python3"
        ln -s python3 "$rootfs/usr/local/bin/python"
        chroot "$rootfs" ldconfig
    else
        debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm "$rootfs" "$mirror"
    fi
    chroot "$rootfs" python3 -c 'import ctypes, lzma, sqlite3, ssl, venv'
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
    tar -C "$rootfs" -c . | podman import --change 'CMD ["/bin/bash"]' - "$base"
fi
stage=image

args=(--build-arg "BASE_IMAGE=$base")
links=() indexes=()
for d in /opt/wheels /opt/pypi /opt/pypi-more; do
    [[ -d $d ]] || continue
    args+=(-v "$d:$d:ro")
    if [[ -d $d/simple ]]; then indexes+=("file://$d/simple"); else links+=("$d"); fi
done
((${#links[@]})) && args+=(--build-arg "PIP_FIND_LINKS=${links[*]}")
((${#indexes[@]})) && args+=(--build-arg "PIP_EXTRA_INDEX_URL=${indexes[*]}")
if [[ -f $ca ]]; then
    args+=(-v "$ca:/run/host-ca.crt:ro" --build-arg PIP_CERT=/run/host-ca.crt)
fi

podman build --isolation=chroot --network host --runtime runc "${args[@]}" \
    --ignorefile "$root/docker/Dockerfile.dockerignore" -f "$root/docker/Dockerfile" -t "$tag" "$root"
podman image prune -f >/dev/null  # the dangling layers of earlier builds (the image is several GB)
