"""The ``hosts:`` form of a scenario: the same comparison on real machines.

Consecutive nodes with one ``host`` address are the ranks of one machine (its GPUs or processes): one torchrun per
machine. ``scenario run`` executes it over SSH (:mod:`.remote_run`); ``--emit plan`` prints what each machine would
run instead, and ``--emit slurm`` writes an sbatch script for clusters run by Slurm. Both write the job files the
ranks read.
"""

from __future__ import annotations

import shlex
from pathlib import Path

from ..netem.commands import host_commands
from ..netem.profiles import LinkSpec
from ..runtime.engine import Job
from ..scenarios.schema import Scenario

PORT = 29_400
ENGINE = "compactbed.runtime.engine"


def machine_links(scenario: Scenario, unlimited_rate: bool = False
                  ) -> tuple[list[str], dict[tuple[int, int], LinkSpec], list[LinkSpec] | None, list[tuple[int, int]]]:
    """Per machine: addresses, the paths between machines (first rank to first rank), access links (a star) and
    paths of their own, the rate lifted for the bound pass; ranks of one machine talk inside it, unshaped."""
    machines = scenario.machines
    addresses = [scenario.nodes[m[0]].host for m in machines]
    n = len(machines)
    links = {(i, j): scenario.link_between(machines[i][0], machines[j][0]) for i in range(n) for j in range(n) if i != j}
    if unlimited_rate:
        links = {k: v.model_copy(update={"rate_mbit": None}) for k, v in links.items()}
    access = scenario.access_links(unlimited_rate=unlimited_rate)
    own = [(i, j) for i, j in links if scenario.overridden(machines[i][0], machines[j][0]) is not None]
    return addresses, links, access and [access[m[0]] for m in machines], own


def shaping_commands(scenario: Scenario, i: int, unlimited_rate: bool = False) -> list[list[str]]:
    addresses, links, access, own = machine_links(scenario, unlimited_rate)
    return host_commands(i, addresses, links, scenario.nodes[scenario.machines[i][0]].interface, access and access[i],
                         [d for s, d in own if s == i])


def torchrun_argv(scenario: Scenario, i: int, jobs: list[str], python: str = "python3",
                  endpoint: str | None = None) -> list[str]:
    """Machine ``i``'s torchrun: c10d rendezvous hosted on machine 0, every job file in turn."""
    machines = scenario.machines
    node = scenario.nodes[machines[i][0]]
    endpoint = endpoint or f"{scenario.nodes[0].host}:{PORT}"
    return [python, "-m", "torch.distributed.run", f"--nnodes={len(machines)}",
            f"--nproc_per_node={len(machines[i])}", f"--node_rank={i}", "--rdzv_backend=c10d",
            f"--rdzv_endpoint={endpoint}", f"--rdzv_id={scenario.name}", f"--rdzv_conf=is_host={int(i == 0)}",
            f"--local_addr={node.host}", "--max_restarts=0", "-m", ENGINE, *jobs]


def write_jobs(scenario: Scenario, results: Path, backend: str, out_root: str | None = None,
               pass_name: str = "") -> list[tuple[Path, Job]]:
    """One job file per (seed, method) under ``results[/pass_name]``; the ranks write beside ``out_root`` (the
    same relative folder under another root, e.g. a host's work folder) or beside the job file."""
    out = []
    for seed in scenario.seeds:
        for method in scenario.methods:
            rel = Path(pass_name) / method.name / f"seed{seed}"
            run_dir = results / rel
            run_dir.mkdir(parents=True, exist_ok=True)
            job = Job(scenario=scenario, method=method, seed=seed, backend=backend,
                      out_dir=str(Path(out_root) / rel) if out_root else str(run_dir.resolve()))
            (run_dir / "job.json").write_text(job.model_dump_json(indent=1))
            out.append((run_dir / "job.json", job))
    return out


def host_plan(scenario: Scenario, results: Path) -> str:
    """What each machine runs, as shell lines (``scenario run --emit plan``)."""
    jobs = [str(f) for f, _ in write_jobs(scenario, results, "auto")]
    out = [f"# {scenario.name}: {len(scenario.machines)} machines; run each block on its machine, as root for tc.",
           f"# job files: {results}/<method>/seed<k>/job.json (the same path on every machine)"]
    for i, ranks in enumerate(scenario.machines):
        node = scenario.nodes[ranks[0]]
        out.append(f"\n## machine {i}: {node.name} ({node.host}, {node.interface}, {len(ranks)} rank(s))")
        if scenario.remote.shape:
            out += [shlex.join(c) for c in shaping_commands(scenario, i)]
        out.append(shlex.join(torchrun_argv(scenario, i, jobs, scenario.remote.python)))
        if scenario.remote.shape:
            out.append(shlex.join(["tc", "qdisc", "del", "dev", node.interface, "root"]) + "   # afterwards")
    return "\n".join(out) + "\n"


def slurm_script(scenario: Scenario, results: Path, backend: str = "auto") -> str:
    """An sbatch script: one task per machine (srun), each a torchrun over its ranks (its GPUs where the scenario
    names ``hardware``), rendezvous on the first node. The results folder must be on a filesystem every node sees."""
    jobs = [str(f) for f, _ in write_jobs(scenario, results, backend)]
    machines = scenario.machines if scenario.on_hosts else [[k] for k in range(scenario.world_size)]
    per = len(machines[0])
    run = [scenario.remote.python, "-m", "torch.distributed.run", "--nnodes=$SLURM_NNODES",
           f"--nproc_per_node={per}", "--rdzv_backend=c10d", "--rdzv_endpoint=$HEAD:29400",
           "--rdzv_id=$SLURM_JOB_ID", "--max_restarts=0", "-m", ENGINE, *jobs]
    return "\n".join([
        "#!/bin/bash",
        f"#SBATCH --job-name={scenario.name}",
        f"#SBATCH --nodes={len(machines)}",
        "#SBATCH --ntasks-per-node=1",
        *([f"#SBATCH --gpus-per-node={per}"] if scenario.hardware else []),
        f"#SBATCH --output={results}/slurm-%j.log",
        f"# {scenario.name}: {scenario.world_size} ranks, {len(scenario.methods)} methods x {len(scenario.seeds)} "
        "seeds; written by `scenario run --emit slurm`",
        "set -euo pipefail",
        'HEAD=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
        "export OMP_NUM_THREADS=1",
        "srun " + " ".join(a if a.startswith(("--nnodes=$", "--rdzv_endpoint=$", "--rdzv_id=$")) else shlex.quote(a)
                           for a in run),
        ""])
