"""The ``hosts:`` form of a scenario: the same run on real machines, shaped with real ``tc netem``.

``scenario run`` on such a scenario prints, per host, the commands that shape its outgoing links and start
its rank for every method in turn (one torchrun, static rendezvous on node 0's address), and writes the job
files the ranks read. This
project does not log into other machines itself; run each block on its host (e.g. with ssh or a cluster tool).
"""

from __future__ import annotations

import shlex
from pathlib import Path

from ..netem.commands import host_commands
from ..runtime.engine import Job
from ..scenarios.schema import Scenario

PORT = 29_400


def host_plan(scenario: Scenario, results: Path, links: dict) -> str:
    addresses = [node.host for node in scenario.nodes]
    access, own = scenario.access_links(), scenario.own_paths()
    out = [f"# {scenario.name}: {scenario.world_size} hosts; run each block on its host, as root for tc.",
           f"# job files: {results}/<method>/seed<k>/job.json (copy the results folder to every host)"]
    for k, node in enumerate(scenario.nodes):
        out.append(f"\n## host {k}: {node.name} ({node.host}, {node.interface})")
        out += [shlex.join(c) for c in host_commands(k, addresses, links, node.interface, access and access[k],
                                                     [d for s, d in own if s == k])]
        jobs = [str(results / method.name / f"seed{seed}" / "job.json") for seed in scenario.seeds
                for method in scenario.methods]
        out.append(shlex.join(["torchrun", "--nproc_per_node=1", f"--nnodes={scenario.world_size}",
                               f"--node_rank={k}", f"--master_addr={addresses[0]}", f"--master_port={PORT}",
                               "-m", "compactbed.runtime.engine", *jobs]))
        out.append(shlex.join(["tc", "qdisc", "del", "dev", node.interface, "root"]) + "   # afterwards: remove shaping")
    return "\n".join(out) + "\n"


def write_host_jobs(scenario: Scenario, results: Path, backend: str) -> None:
    for seed in scenario.seeds:
        for method in scenario.methods:
            run_dir = results / method.name / f"seed{seed}"
            run_dir.mkdir(parents=True, exist_ok=True)
            job = Job(scenario=scenario, method=method, seed=seed, out_dir=str(run_dir), backend=backend)
            (run_dir / "job.json").write_text(job.model_dump_json(indent=1))
