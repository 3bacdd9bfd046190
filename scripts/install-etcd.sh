#!/usr/bin/env bash
# etcd 3.5 (etcd, etcdctl, etcdutl) for the tests and the twin, unpacked into .tools/etcd/ of this checkout.
#
# Why not the machine's apt: Debian bookworm carries etcd 3.4.23 (no etcdutl, no --bump-revision), while
# production (kubeadm 1.34) runs etcd 3.6. The newest etcd a Debian archive carries is 3.5.30 in sid; its
# binaries are Go programs that run on bookworm when unpacked with dpkg-deb -x (measured: etcd --version
# 3.5.30, etcdutl version 3.5.30). apt reads a scratch sources list and state directory, so the machine's own
# apt configuration and package database are left exactly as they were.
set -euo pipefail
version=${ETCD_DEB_VERSION:-3.5.30}
dest=${1:-.tools/etcd}
if [ -x "$dest/usr/bin/etcd" ] && "$dest/usr/bin/etcd" --version 2>/dev/null | grep -q "etcd Version: $version"; then
  exit 0
fi
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
mkdir -p "$scratch/lists/partial" "$scratch/cache/archives/partial" "$scratch/debs"
echo "deb http://deb.debian.org/debian sid main" > "$scratch/sources.list"
apt_opts=(-o "Dir::Etc::sourcelist=$scratch/sources.list" -o "Dir::Etc::sourceparts=-"
          -o "Dir::State::Lists=$scratch/lists" -o "Dir::Cache=$scratch/cache" -o "APT::Sandbox::User=root")
echo "==> etcd $version from Debian sid (dpkg-deb -x into $dest)"
apt-get "${apt_opts[@]}" -qq update
(cd "$scratch/debs" && apt-get "${apt_opts[@]}" -qq download "etcd-server=$version-*" "etcd-client=$version-*")
rm -rf "$dest"
mkdir -p "$dest"
for deb in "$scratch"/debs/*.deb; do dpkg-deb -x "$deb" "$dest"; done
"$dest/usr/bin/etcd" --version | head -1
"$dest/usr/bin/etcdutl" version | head -1
