#!/usr/bin/env bash
# bench/kill_rank.sh: the kill drill's launcher wrapper. Under mpirun (or srun) every rank runs
#   bash bench/kill_rank.sh RANK SECONDS program args...
# and becomes `program args...`; on world rank RANK the process is killed with SIGKILL after
# SECONDS (a crash: no MPI_Finalize, no cleanup). The job must then end non-zero, every rank,
# not hang: mpirun (or srun) stops the others when one exits abnormally. bench/device.sh runs it
# with a stage timeout and judges the exit code (stage_must_fail).
# KILL_RANK_SIGNAL=STOP stalls the rank instead (SIGSTOP, left stopped): the others must end on
# AUTOMOE_DIST_TIMEOUT. Whoever runs that drill sends the stalled pid (printed) SIGKILL after.
set -euo pipefail
[ $# -ge 3 ] || { echo "usage: kill_rank.sh RANK SECONDS program [args...]" >&2; exit 2; }
victim=$1 secs=$2
shift 2
sig=${KILL_RANK_SIGNAL:-KILL}
me=${OMPI_COMM_WORLD_RANK:-${PMI_RANK:-${SLURM_PROCID:-${RANK:-}}}}
[ -n "$me" ] || { echo "kill_rank.sh: no rank in the environment (run it under mpirun or srun)" >&2; exit 2; }
if [ "$me" = "$victim" ]; then
  # $$ is this shell, which exec turns into the program: the signal hits the rank itself
  ( sleep "$secs"; echo "kill_rank.sh: SIG$sig to rank $me (pid $$) after $secs s" >&2; kill -"$sig" $$ ) &
fi
exec "$@"
