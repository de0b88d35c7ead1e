"""Launching a run: one launch path for every launcher.

- `runner.py`: `run(cfg, site)`: start, wire and supervise a run's processes, summarise it;
- `sites.py`: the `Site` protocol (where processes start), `LocalSite` (this machine) and
  `SlurmSite` (the nodes of a Slurm job; its driver is megatron_opd/slurm/job.py);
- `fleet.py`: what starts, computed once from the config for every site: the SGLang fleets
  (`ServerSpec`s) and the learner's torchrun line;
- `checks.py`: what every launcher refuses before anything starts (`preflight`);
- `rundir.py`: the run directory (fresh, resumed, overwritten) and the run secret;
- `local.py`: `megatron-opd train` (the embedded launcher) and `precompute-teacher`.

Errors and exit statuses of every entry point: megatron_opd/errors.py.
"""

from megatron_opd.errors import ProcessDied, RunFailed, Terminated
from megatron_opd.launch.checks import check_learner_here, check_startable, preflight
from megatron_opd.launch.fleet import (ServerSpec, fleet_specs, server_options,
                                       torchrun_command)
from megatron_opd.launch.local import precompute_teacher, train
from megatron_opd.launch.rundir import RESUMABLE_CHANGES, prepare_run_dir, run_secret
from megatron_opd.launch.runner import RESTARTS_FILE, run
from megatron_opd.launch.sites import LocalSite, Site, SlurmSite, make_servers, place_fleets

_run_secret = run_secret  # the name callers used before the package

__all__ = ["LocalSite", "ProcessDied", "RESTARTS_FILE", "RESUMABLE_CHANGES", "RunFailed",
           "ServerSpec", "Site", "SlurmSite", "Terminated", "check_learner_here",
           "check_startable", "fleet_specs", "make_servers", "place_fleets", "precompute_teacher",
           "prepare_run_dir", "preflight", "run", "run_secret", "server_options",
           "torchrun_command", "train"]
