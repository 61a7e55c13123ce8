#!/bin/sh
# Airlock's base image, made from Debian's own packages with Debian's mmdebstrap (no public base image is pulled):
# Debian 12 "bookworm", the minbase variant (Essential: yes and Priority: required packages only, mmdebstrap(1)),
# plus Python 3 and its venv module. Imported as localhost/airlock/debian-base:bookworm for the Containerfiles.
#
#   deploy/containers/make-base.sh [--mirror URL] [--mirror-security URL] [--tag NAME] [--tar FILE]
#
# --mirror (or MIRROR): the site's Debian mirror (default http://deb.debian.org/debian). --mirror-security (or
# MIRROR_SECURITY): its security suite, by default the mirror's URL with "-security" appended (Debian's own layout:
# .../debian and .../debian-security); "" leaves the security suite out (a mirror without it). Nothing else is asked.
# SOURCE_DATE_EPOCH (reproducible-builds.org): mmdebstrap then makes a bit-for-bit reproducible tarball from the
# same mirror state (mmdebstrap(1), "SOURCE_DATE_EPOCH"). The Debian packages in the image are listed in
# /usr/share/airlock/sbom/debian-packages.txt (dpkg-query; Debian ships no CycloneDX generator for dpkg).
set -eu

MIRROR="${MIRROR:-http://deb.debian.org/debian}"
TAG="${TAG:-localhost/airlock/debian-base:bookworm}"
TAR=""
while [ $# -gt 0 ]; do
    case "$1" in
        --mirror) MIRROR="$2"; shift 2 ;;
        --mirror-security) MIRROR_SECURITY="$2"; shift 2 ;;
        --tag) TAG="$2"; shift 2 ;;
        --tar) TAR="$2"; shift 2 ;;
        -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
        *) echo "make-base.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
done

MIRROR="${MIRROR%/}"
MIRROR_SECURITY="${MIRROR_SECURITY-$MIRROR-security}"

for tool in mmdebstrap podman; do
    command -v "$tool" >/dev/null || { echo "make-base.sh needs Debian's $tool (make system-packages)" >&2; exit 1; }
done

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
out="${TAR:-$work/base.tar}"

# Sources: bookworm and its updates, and the security suite (deb822 lines, as apt's sources.list(5)).
set -- "deb $MIRROR bookworm main" "deb $MIRROR bookworm-updates main"
[ -z "$MIRROR_SECURITY" ] || set -- "$@" "deb $MIRROR_SECURITY bookworm-security main"

# No documentation, manual pages or translations (dpkg path-exclude, as Debian's own slim images); apt's lists and
# caches removed; the package listing written for the image's SBOM. No setuid/setgid file (passwd, su, mount...
# come with minbase): the images run as uid 10001 and never change user, and under no-new-privileges (the chart's
# allowPrivilegeEscalation: false) the bits would be ignored anyway (CIS Docker Benchmark 4.8, "Remove setuid and
# setgid permissions in the images").
mmdebstrap --variant=minbase --include=python3,python3-venv --mode=auto \
    --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/doc/*' \
    --dpkgopt='path-include=/usr/share/doc/*/copyright' --dpkgopt='path-exclude=/usr/share/locale/*' \
    --customize-hook='mkdir -p "$1/usr/share/airlock/sbom"' \
    --customize-hook='chroot "$1" dpkg-query -W -f "\${Package}\t\${Version}\t\${Architecture}\n" | LC_ALL=C sort > "$1/usr/share/airlock/sbom/debian-packages.txt"' \
    --customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/* "$1"/var/log/*' \
    --customize-hook='find "$1" -xdev -type f -perm /6000 -exec chmod ug-s {} +' \
    bookworm "$out" "$@"

podman import --quiet \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'CMD ["/bin/bash"]' \
    --message "Debian bookworm minbase + python3 (mmdebstrap, mirror $MIRROR)" \
    "$out" "$TAG" >/dev/null
echo "$TAG"
