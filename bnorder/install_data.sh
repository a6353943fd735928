#!/usr/bin/env bash
# Installs Fashion-MNIST from Debian's `dataset-fashion-mnist` package (DESIGN §8).
#   1. already installed system-wide (/usr/share/datasets/fashion-mnist) → nothing to do;
#   2. as root: apt-get install -y dataset-fashion-mnist (apt-get update first if needed);
#   3. otherwise: apt-get download + dpkg -x into $BNORDER_CACHE (default: <repo>/.cache/debian),
#      where bnorder.data looks as well.
# This is the only place anything is fetched; nothing downloads at run time.
set -u
PKG=dataset-fashion-mnist
SYS_DIR=/usr/share/datasets/fashion-mnist
REPO="$(cd "$(dirname "$0")/.." && pwd)"
CACHE="${BNORDER_CACHE:-$REPO/.cache/debian}"
FILES="train-images-idx3-ubyte.gz train-labels-idx1-ubyte.gz t10k-images-idx3-ubyte.gz t10k-labels-idx1-ubyte.gz"

have_all() {
    for f in $FILES; do [ -s "$1/$f" ] || return 1; done
}

if have_all "$SYS_DIR"; then
    echo "fashion-mnist: found in $SYS_DIR"; exit 0
fi
if have_all "$CACHE$SYS_DIR"; then
    echo "fashion-mnist: found in $CACHE$SYS_DIR"; exit 0
fi

if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null; then
    echo "fashion-mnist: apt-get install -y $PKG"
    if ! apt-get install -y -q "$PKG" >/dev/null 2>&1; then
        apt-get update -q >/dev/null 2>&1 && apt-get install -y -q "$PKG" >/dev/null 2>&1
    fi
    if have_all "$SYS_DIR"; then echo "fashion-mnist: installed in $SYS_DIR"; exit 0; fi
fi

if command -v apt-get >/dev/null && command -v dpkg >/dev/null; then
    echo "fashion-mnist: apt-get download $PKG + dpkg -x into $CACHE"
    tmp="$(mktemp -d)"
    if (cd "$tmp" && apt-get download -q "$PKG" >/dev/null 2>&1) \
            && mkdir -p "$CACHE" && dpkg -x "$tmp"/"$PKG"_*.deb "$CACHE"; then
        rm -rf "$tmp"
        if have_all "$CACHE$SYS_DIR"; then echo "fashion-mnist: unpacked in $CACHE$SYS_DIR"; exit 0; fi
    fi
    rm -rf "$tmp"
fi

cat >&2 <<MSG
fashion-mnist: could not install the data set. Either
  - as root:  apt-get update && apt-get install -y $PKG      (files land in $SYS_DIR), or
  - as a user: apt-get download $PKG && dpkg -x ${PKG}_*.deb $CACHE
               (bnorder then reads $CACHE$SYS_DIR),
or pass --data-dir DIR holding the four *-ubyte.gz files.
MSG
exit 1
