#!/bin/bash
# What bench/gpu_session.sh carries to the GPU machine, which reaches no network: a faiss-cpu
# wheel and the py-spy binary in .whl/, and the first 300 ImageNet photos of ../shared in
# .gpudata/photos (~58 MiB together; a device run carries 64 MiB at most). Both folders are
# ignored by git (.git/info/exclude). Then: run `bash bench/gpu_session.sh` with carry
# [".whl", ".gpudata"].
set -eu
PHOTOS=${PHOTOS:-../shared/data/imagenet-sample}
mkdir -p .whl .gpudata/photos
for path in .whl .gpudata; do
  grep -qx "/$path/" .git/info/exclude 2>/dev/null || echo "/$path/" >> .git/info/exclude
done
if ! ls .whl/faiss_cpu-*.whl >/dev/null 2>&1; then
  .venv/bin/pip download --quiet --no-deps --only-binary=:all: faiss-cpu -d .whl
fi
if [ ! -x .whl/py-spy ]; then
  tmp=$(mktemp -d)
  .venv/bin/pip download --quiet --no-deps --only-binary=:all: py-spy -d "$tmp"
  unzip -p "$tmp"/py_spy-*.whl '*/scripts/py-spy' > .whl/py-spy
  chmod +x .whl/py-spy
  rm -rf "$tmp"
fi
find "$PHOTOS" -maxdepth 1 -type f -iname '*.jpeg' | sort | head -300 \
  | xargs -I{} cp -n {} .gpudata/photos/
if [ -z "$(ls -A .gpudata/photos)" ]; then
  echo "no JPEG photos found in $PHOTOS: set PHOTOS to a folder of them" >&2
  exit 1
fi
du -sh .whl .gpudata
