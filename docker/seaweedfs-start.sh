#!/bin/sh
# The object store of docker-compose.yml: SeaweedFS (master, volume server, filer and S3 gateway
# in one process). The identities file that makes every S3 request need a signature is written
# here, at start, from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY: the secrets live in .env only,
# never in the repository or an image. Without the file SeaweedFS would allow anonymous access.
#
# STORE_HOST is the name the other containers reach the store by; extra arguments go to weed.
set -eu

: "${AWS_ACCESS_KEY_ID:?set AWS_ACCESS_KEY_ID in .env (see .env.example)}"
: "${AWS_SECRET_ACCESS_KEY:?set AWS_SECRET_ACCESS_KEY in .env (see .env.example)}"
# The keys go into JSON as they are: refuse the characters that would need escaping.
case "${AWS_ACCESS_KEY_ID}${AWS_SECRET_ACCESS_KEY}" in
  *[!A-Za-z0-9_.~+/=-]*)
    echo "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY may hold only letters, digits and _.~+/=-" >&2
    exit 64
    ;;
esac

config="${S3_CONFIG:-/tmp/s3-identities.json}"
umask 077
printf '{"identities": [{"name": "anytime-prune", "credentials": [{"accessKey": "%s", "secretKey": "%s"}], "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}\n' \
  "$AWS_ACCESS_KEY_ID" "$AWS_SECRET_ACCESS_KEY" > "$config"

# 1 GiB volumes, as many as the disk holds (-volume.max=0), allocated as they fill.
exec weed server \
  -dir="${STORE_DIR:-/data}" \
  -ip="${STORE_HOST:-store}" -ip.bind="${STORE_BIND:-0.0.0.0}" \
  -master.volumeSizeLimitMB=1024 -master.volumePreallocate=false -volume.max=0 \
  -s3 -s3.port="${S3_PORT:-8333}" -s3.config="$config" \
  "$@"
