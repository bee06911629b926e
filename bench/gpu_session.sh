#!/bin/bash
# One prepared GPU session (the device machine lacks faiss): carry .whl (a faiss-cpu wheel, and
# py-spy for PROFILE=1) and .gpudata/photos (ImageNet-size photos), both made by
# bench/gpu_prepare.sh; install, run the GPU-side
# tests, probe nvJPEG beside what a build runs (bench/nvjpeg_probe.py; PROBE=0 skips it),
# measure both decode paths end to end in one run (bench/gpudecode.py, the photos linked
# COPIES times, the scenes SCENE_COPIES times), then with PROFILE=1 sample a GPU build of
# those photos with py-spy ($OUT/gpu.txt, raw stacks of every thread).
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site \
  .whl/*.whl 2>&1 | tail -1
export PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "import torch, torchvision; print(torch.__version__, torchvision.__version__, torch.cuda.is_available())"
timeout 150 python3 -m pytest -q -x -p no:cacheprovider tests/test_gpudecode.py tests/test_balance.py \
  tests/test_jpegroute.py 2>&1 | tail -4
[ "${PROBE:-1}" = 1 ] && timeout 120 python3 bench/nvjpeg_probe.py .gpudata/photos
timeout "${BENCH_TIMEOUT:-330}" python3 bench/gpudecode.py --photos .gpudata/photos --rounds 1 \
  --scenes 3000 --copies "${COPIES:-200}" --scene-copies "${SCENE_COPIES:-1}" ${BENCH_FLAGS:-} \
  $(for v in ${VARIANTS:-256:groups}; do echo --gpu-variant "$v"; done)
if [ "${PROFILE:-0}" = 1 ] && [ -d /tmp/gpudecode/photos ]; then
  chmod +x .whl/py-spy
  timeout 120 .whl/py-spy record --threads --idle -r 20 -f raw -o "$OUT/gpu.txt" -- \
    python3 -c "from indexer.cli.main import entry; entry()" -v build /tmp/gpudecode/photos \
    --out /tmp/gp-out --checkpoint /tmp/gpudecode/seed0.safetensors --no-progress \
    --batch-size 256 --workers 14 --decode gpu --device cuda 2>&1 \
    | grep -E "after the first|decoded on|by stage|published"
fi
