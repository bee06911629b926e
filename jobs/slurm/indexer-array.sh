#!/usr/bin/env bash
# One collection built by a Slurm job array: task I of N runs `indexer build --partition I/N`
# into DIR/parts/; a dependent job merges the parts and builds the index.
#
#   parts=$(sbatch --parsable --array=0-7 jobs/slurm/indexer-array.sh /data/photos /data/photos.idx)
#   sbatch --dependency=afterok:$parts --wrap "indexer index /data/photos.idx"
#
# A task that fails or is preempted can be resubmitted alone (--array=3): it resumes.
#SBATCH --job-name=indexer-parts
#SBATCH --cpus-per-task=8
#SBATCH --mem=16G
#SBATCH --time=12:00:00
set -euo pipefail
source_dir=${1:?usage: indexer-array.sh SOURCE DIR}
out=${2:?usage: indexer-array.sh SOURCE DIR}
count=${SLURM_ARRAY_TASK_COUNT:?run with sbatch --array=0-(N-1)}
index=${SLURM_ARRAY_TASK_ID:?run with sbatch --array}
status=0
indexer build "$source_dir" --out "$out" --partition "$index/$count" \
  --workers "${SLURM_CPUS_PER_TASK:-2}" --no-progress || status=$?
# 5: partial (failures within the budget) is a finished part
if [ "$status" -eq 5 ]; then exit 0; fi
exit "$status"
