#!/usr/bin/env bash
# Pack the Python packages the device machine lacks (bench/device/requirements.txt) into one
# xz-compressed folder that fits the device's 64 MiB working-tree limit beside Fashion-MNIST's
# gz files (wheels: ~40 MB; this: ~22 MB, without prefect's web UI, which a study never serves).
#   bash bench/device/pack.sh            # writes .device/site.tar.xz (git-ignored)
# On the device:  tar -xJf .device/site.tar.xz -C /tmp && export PYTHONPATH=/tmp/site:$PWD/src:$PWD
set -euo pipefail
cd "$(dirname "$0")/../.."
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
    --platform manylinux_2_5_x86_64 -d "$work/wheels" -r bench/device/requirements.txt
python3 -m pip install --quiet --no-index --no-deps --no-compile --target "$work/site" --python-version 3.12 \
    --implementation cp --only-binary=:all: "$work"/wheels/*.whl
rm -rf "$work/site/prefect/server/ui" "$work/site/prefect/server/ui-v2" "$work/site/bin"
mkdir -p .device
tar -C "$work" -cf - site | xz -9 -T0 > .device/site.tar.xz.tmp
mv .device/site.tar.xz.tmp .device/site.tar.xz
grep -qx '/.device/' .git/info/exclude 2>/dev/null || echo '/.device/' >> .git/info/exclude
ls -l .device/site.tar.xz
