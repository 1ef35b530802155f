#!/usr/bin/env bash
# Train mmjax on a Cloud TPU pod slice (a multi-host TPU VM) from your workstation.
#
#   bash launch/tpu_pod.sh --name NAME --zone ZONE --accelerator-type v5p-64 \
#       [--version RUNTIME] [--project PROJECT] [--repo URL | --copy] [--skip-install] \
#       [--dry-run] -- TRAIN_ARGS...
#
#   --name NAME               TPU VM name; reused when it exists, created otherwise
#   --zone ZONE               e.g. us-east5-a
#   --accelerator-type TYPE   e.g. v4-32, v5p-64, v5litepod-16, v6e-16 (only for create)
#   --version RUNTIME         TPU software version for create; default by generation:
#                             v2/v3/v4 tpu-ubuntu2204-base, v5p v2-alpha-tpuv5,
#                             v5litepod v2-alpha-tpuv5-lite, v6e v2-alpha-tpuv6e
#   --project PROJECT         GCP project (default: gcloud's configured project)
#   --copy                    ship this working tree (tracked and untracked-but-not-ignored
#                             files) as a tarball to ~/mmjax on every worker (default)
#   --repo URL                instead, git clone URL into ~/mmjax on every worker (or pull)
#   --skip-install            do not (re)install the venv on the workers
#   --dry-run                 print every command (gcloud, tar) instead of running it; the
#                             describe check is skipped and the VM assumed missing
#   TRAIN_ARGS                arguments of python -m mmjax.train, e.g.
#                             --config configs/coca.py:size=base --workdir /mnt/shared/run1
#
# Steps: describe-or-create the VM; ship the code; on every worker create ~/mmjax/.venv
# with Python 3.11 (from apt when missing) and pip install -e '.[gcs]' 'jax[tpu]'; then run
# `python -m mmjax.train TRAIN_ARGS` on all workers at once (gcloud ssh --worker=all) with
# MMJAX_DISTRIBUTED=tpu, so mmjax.runtime.distributed lets JAX find the pod's hosts itself.
# Each worker reads its own rows of every batch; process 0 writes metrics. --workdir is
# where all workers write checkpoints and read them back: a gs://BUCKET/PATH URL (the VMs'
# service account needs read/write on the bucket) or a filesystem they share (NFS,
# Filestore); data specs may be gs:// URLs too (wds shards, CSVs).
set -euo pipefail

usage() {
  echo "usage: bash launch/tpu_pod.sh --name NAME --zone ZONE --accelerator-type TYPE" \
    "[--version V] [--project P] [--repo URL|--copy] [--skip-install] [--dry-run]" \
    "-- TRAIN_ARGS..." >&2
  exit 2
}

name="" zone="" accel="" version="" project="" repo="" dry_run=0 install=1
while [ $# -gt 0 ]; do
  case "$1" in
    --name) name="${2:?--name needs a value}"; shift 2 ;;
    --zone) zone="${2:?--zone needs a value}"; shift 2 ;;
    --accelerator-type) accel="${2:?--accelerator-type needs a value}"; shift 2 ;;
    --version) version="${2:?--version needs a value}"; shift 2 ;;
    --project) project="${2:?--project needs a value}"; shift 2 ;;
    --repo) repo="${2:?--repo needs a URL}"; shift 2 ;;
    --copy) repo=""; shift ;;
    --skip-install) install=0; shift ;;
    --dry-run) dry_run=1; shift ;;
    --) shift; break ;;
    -h|--help)  # The header comment.
      awk 'NR > 1 && !/^#/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "${BASH_SOURCE[0]}"
      exit 0
      ;;
    *) echo "error: unknown argument '$1'" >&2; usage ;;
  esac
done
for required in name zone accel; do
  if [ -z "${!required}" ]; then
    flag="--$required"
    [ "$required" = accel ] && flag="--accelerator-type"
    echo "error: $flag is required" >&2
    usage
  fi
done
[ $# -gt 0 ] || { echo "error: no mmjax.train arguments after --" >&2; usage; }

if [ -z "$version" ]; then
  case "$accel" in
    v5litepod-*|v5e-*) version=v2-alpha-tpuv5-lite ;;
    v5p-*) version=v2-alpha-tpuv5 ;;
    v6e-*) version=v2-alpha-tpuv6e ;;
    v2-*|v3-*|v4-*) version=tpu-ubuntu2204-base ;;
    *)
      echo "error: no default --version for --accelerator-type $accel; pass --version" >&2
      exit 2
      ;;
  esac
fi

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
where=(--zone "$zone")
[ -n "$project" ] && where+=(--project "$project")

quote() {  # Words as a shell would need them: plain when safe, else single-quoted.
  local out=() word
  for word in "$@"; do
    if [[ "$word" =~ ^[A-Za-z0-9_./:=@,+%^-]+$ ]]; then
      out+=("$word")
    else
      out+=("'${word//\'/\'\\\'\'}'")
    fi
  done
  echo "${out[*]}"
}

run() {  # Runs a command, or prints it under --dry-run.
  if [ "$dry_run" = 1 ]; then
    quote "$@"
  else
    echo "[tpu_pod] $(quote "$@")" >&2
    "$@"
  fi
}

on_workers() {  # Runs a shell command on every worker of the pod.
  run gcloud compute tpus tpu-vm ssh "$name" "${where[@]}" --worker=all --command "$1"
}

# 1. The TPU VM.
if [ "$dry_run" = 1 ]; then
  echo "# if this fails, the VM is created with the command after it:"
  quote gcloud compute tpus tpu-vm describe "$name" "${where[@]}" --format='value(state)'
  run gcloud compute tpus tpu-vm create "$name" "${where[@]}" --accelerator-type "$accel" \
    --version "$version"
elif state="$(gcloud compute tpus tpu-vm describe "$name" "${where[@]}" \
    --format='value(state)' 2>/dev/null)"; then
  echo "[tpu_pod] reusing $name ($state)" >&2
else
  run gcloud compute tpus tpu-vm create "$name" "${where[@]}" --accelerator-type "$accel" \
    --version "$version"
fi

# 2. The code, in ~/mmjax on every worker.
if [ -n "$repo" ]; then
  on_workers "if [ -d ~/mmjax/.git ]; then git -C ~/mmjax pull --ff-only;\
 else git clone $(quote "$repo") ~/mmjax; fi"
else
  tarball="${TMPDIR:-/tmp}/mmjax-$name.tar.gz"
  if [ "$dry_run" = 1 ]; then
    echo "(cd $(quote "$root") && git ls-files -z --cached --others --exclude-standard" \
      "| tar --null -T - -czf $(quote "$tarball"))"
  else
    (cd "$root" && git ls-files -z --cached --others --exclude-standard \
      | tar --null -T - -czf "$tarball")
  fi
  run gcloud compute tpus tpu-vm scp "$tarball" "$name:mmjax.tar.gz" "${where[@]}" --worker=all
  on_workers "mkdir -p ~/mmjax && tar -xzf ~/mmjax.tar.gz -C ~/mmjax && rm ~/mmjax.tar.gz"
fi

# 3. Python 3.11 + the package and JAX for TPU, on every worker.
if [ "$install" = 1 ]; then
  on_workers "set -e; cd ~/mmjax; if ! command -v python3.11 >/dev/null; then\
 sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive\
 apt-get install -y -qq python3.11 python3.11-venv; fi;\
 [ -x .venv/bin/python ] || python3.11 -m venv .venv;\
 .venv/bin/python -m pip install -q -U pip;\
 .venv/bin/python -m pip install -q -e '.[gcs]' 'jax[tpu]'"
fi

# 4. Train: the same command on every worker at once.
on_workers "cd ~/mmjax && MMJAX_DISTRIBUTED=tpu .venv/bin/python -m mmjax.train $(quote "$@")"
