#!/usr/bin/env bash
# Run an indexer job from cron. Exit 75 (another run still holds the collection) is not an
# error for a schedule: log it and exit 0 so cron sends no mail. Every other status passes
# through (0 success, 5 partial, 6 too many failures, others failures).
#
#   crontab -e
#   30 2 * * *  /opt/indexer/jobs/cron/indexer-job.sh /etc/indexer/photos.toml >> /var/log/indexer-photos.log 2>&1
set -u
INDEXER=${INDEXER:-/opt/indexer/.venv/bin/indexer}
job=${1:?usage: indexer-job.sh JOB.toml}
echo "$(date -Is) starting $job"
"$INDEXER" run "$job"
status=$?
if [ "$status" -eq 75 ]; then
  echo "$(date -Is) skipped: the previous run is still going"
  exit 0
fi
echo "$(date -Is) finished $job with status $status"
exit "$status"
