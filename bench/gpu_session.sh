#!/bin/bash
# One prepared GPU session (the device machine lacks faiss): carry .whl (a faiss-cpu wheel) and
# .gpudata/photos (ImageNet-size photos); install, run the GPU-side tests, measure both decode
# paths end to end in one run (bench/gpudecode.py).
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site \
  .whl/*.whl 2>&1 | tail -1
export PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "import torch, torchvision; print(torch.__version__, torchvision.__version__, torch.cuda.is_available())"
timeout 150 python3 -m pytest -q -x -p no:cacheprovider tests/test_gpudecode.py \
  tests/test_jpegroute.py 2>&1 | tail -4
timeout "${BENCH_TIMEOUT:-400}" python3 bench/gpudecode.py --photos .gpudata/photos --rounds 1 \
  --scenes 3000 --copies 20
