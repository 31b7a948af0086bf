#!/usr/bin/env bash
# System packages the project needs, installed only when missing (idempotent, fast when nothing is to do):
#   libturbojpeg0-dev libopencv-dev pkg-config  -> build ffcv from source
#   prometheus                                  -> the monitoring tests and `make monitor` run a real server
#   dataset-fashion-mnist                       -> --dataset fashion-mnist without a download
#                                                  (IDX files in /usr/share/datasets/fashion-mnist)
set -euo pipefail
PKGS=(libturbojpeg0-dev libopencv-dev pkg-config prometheus dataset-fashion-mnist)
missing=()
for p in "${PKGS[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
echo "installing system packages: ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
