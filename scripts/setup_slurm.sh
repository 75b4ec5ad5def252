#!/usr/bin/env bash
# Install SLURM (Debian's slurm-wlm) and munge for the multi-node tests, which start a real 2-node
# cluster of their own on loopback (tests/slurm_cluster.py). Idempotent and fast when present: it
# only looks for the programs. It never starts, configures or enables a daemon, and it touches no
# cluster configuration: the tests bring their own slurm.conf, munge key and socket.
#
#   root with apt-get (CI): installs, and fails loudly when the install fails (CI must run the tests)
#   otherwise: says what is missing; the multi-node tests then skip, naming the reason
#   ALIGNMENT_SKIP_SLURM_SETUP=1: do nothing
set -euo pipefail

[[ ${ALIGNMENT_SKIP_SLURM_SETUP:-} == 1 ]] && exit 0

programs=(sbatch srun scontrol squeue scancel sinfo slurmctld slurmd munged)
missing=()
for p in "${programs[@]}"; do
  # slurmctld, slurmd and munged live in /usr/sbin, which a non-root PATH may lack
  command -v "$p" >/dev/null 2>&1 || [[ -x /usr/sbin/$p ]] || missing+=("$p")
done
((${#missing[@]} == 0)) && exit 0

if [[ $(id -u) != 0 ]] || ! command -v apt-get >/dev/null 2>&1; then
  echo "setup_slurm: ${missing[*]} not installed and cannot install them here (needs root and apt-get):" \
    "the multi-node tests will skip. Install with: apt-get install slurm-wlm munge" >&2
  exit 0
fi

echo "setup_slurm: installing slurm-wlm and munge (missing: ${missing[*]})" >&2
export DEBIAN_FRONTEND=noninteractive
# Without systemd the packages' install scripts would start munged and slurmd through
# invoke-rc.d; a policy-rc.d that says no (the usual container practice) keeps them stopped.
policy=/usr/sbin/policy-rc.d
if [[ ! -e $policy ]]; then
  printf '#!/bin/sh\nexit 101\n' >"$policy"
  chmod 755 "$policy"
  trap 'rm -f "$policy"' EXIT
fi
apt=(apt-get install -y -q --no-install-recommends slurm-wlm munge)
# A fresh image may have no package lists yet; only then is `apt-get update` needed.
if ! "${apt[@]}" >/tmp/setup_slurm_apt.log 2>&1; then
  apt-get update -q >>/tmp/setup_slurm_apt.log 2>&1
  if ! "${apt[@]}" >>/tmp/setup_slurm_apt.log 2>&1; then
    tail -n 20 /tmp/setup_slurm_apt.log >&2
    echo "setup_slurm: apt-get install slurm-wlm munge failed (log: /tmp/setup_slurm_apt.log)" >&2
    exit 1
  fi
fi
echo "setup_slurm: ready ($(sbatch --version))" >&2
