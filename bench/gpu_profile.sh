#!/bin/bash
# Where a GPU build's time goes: py-spy (copy .venv/bin/py-spy to .whl/py-spy and carry .whl and
# .gpudata, as for bench/gpu_session.sh) samples every thread of `indexer build` over 6,000
# photos; DECODE=cpu|gpu; the raw stacks land in $OUT/DECODE.txt.
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site \
  .whl/*.whl 2>&1 | tail -1
export PYTHONPATH=/tmp/site:$PWD
W=/tmp/gp
mkdir -p $W/photos
python3 -c "import sys; sys.path.insert(0, 'bench'); from pathlib import Path; \
from throughput import write_checkpoint; write_checkpoint(Path('$W/ck.safetensors'))"
for n in $(seq -w 0 19); do cp -r .gpudata/photos $W/photos/copy$n; done
chmod +x .whl/py-spy
timeout 200 .whl/py-spy record --threads --idle -r 40 -f raw -o "$OUT/${DECODE:-gpu}.txt" -- \
  python3 -c "from indexer.cli.main import entry; entry()" -v build $W/photos --out $W/out \
  --checkpoint $W/ck.safetensors --no-progress --batch-size 256 --workers 14 \
  --decode "${DECODE:-gpu}" --device cuda 2>&1 | grep -E "after the first|decoded on|published"
