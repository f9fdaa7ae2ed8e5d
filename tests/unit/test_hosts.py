"""The hosts form without machines: ranks grouped per host, each host's torchrun, the plan, the Slurm script, the
preflight's verdicts and rate-only shaping where a kernel lacks netem."""

import pytest
from compactbed.scenarios.schema import ScenarioError, parse_scenario
from compactbed.testbed.cli import main
from compactbed.testbed.hosts import host_plan, slurm_script, torchrun_argv
from compactbed.testbed.remote import Host, problems
from compactbed.testbed.remote_run import _rate_only


def hosts(addresses, **kw):
    nodes = [{"name": f"n{k}", "host": a, "interface": "eth1"} for k, a in enumerate(addresses)]
    return parse_scenario(dict(name="h", nodes=nodes, methods=["ring", "compact-1bit"], labels=4, steps=2,
                               link={"rate_mbit": 100, "delay_ms": 5}) | kw)


def test_consecutive_nodes_of_one_address_are_one_machines_ranks():
    s = hosts(["10.0.0.1", "10.0.0.1", "10.0.0.2", "10.0.0.2"])
    assert s.machines == [[0, 1], [2, 3]]
    argv = torchrun_argv(s, 1, ["a.json", "b.json"], "/opt/py", "10.0.0.1:1234")
    assert argv[:3] == ["/opt/py", "-m", "torch.distributed.run"]
    assert {"--nnodes=2", "--nproc_per_node=2", "--node_rank=1", "--rdzv_backend=c10d",
            "--rdzv_endpoint=10.0.0.1:1234", "--rdzv_conf=is_host=0", "--local_addr=10.0.0.2"} <= set(argv)
    assert argv[-2:] == ["a.json", "b.json"]
    with pytest.raises(ScenarioError, match="must be consecutive"):
        hosts(["10.0.0.1", "10.0.0.2", "10.0.0.1", "10.0.0.2"])
    with pytest.raises(ScenarioError, match="as many"):
        hosts(["10.0.0.1", "10.0.0.1", "10.0.0.1", "10.0.0.2"])
    with pytest.raises(ScenarioError, match="workdir is an absolute path"):
        hosts(["10.0.0.1", "10.0.0.2"], remote={"workdir": "tmp/x"})


def test_the_plan_shapes_each_machine_and_starts_one_torchrun(tmp_path):
    s = hosts(["10.0.0.1", "10.0.0.1", "10.0.0.2", "10.0.0.2"])
    plan = host_plan(s, tmp_path)
    assert plan.count("torch.distributed.run") == 2 and plan.count("delay 10.0ms") == 2     # a star: both access links
    assert "match ip dst 10.0.0.2/32" in plan and "tc qdisc del dev eth1 root" in plan
    assert len(list(tmp_path.rglob("job.json"))) == 2
    plain = host_plan(hosts(["10.0.0.1", "10.0.0.2"], remote={"shape": False}), tmp_path / "p")
    assert "tc " not in plain and plain.count("torch.distributed.run") == 2


def test_slurm_script_runs_one_torchrun_per_machine(tmp_path):
    s = hosts(["a", "a", "b", "b"], hardware={"device": "h100-sxm", "gpus_per_node": 2})
    text = slurm_script(s, tmp_path)
    assert "#SBATCH --nodes=2" in text and "#SBATCH --gpus-per-node=2" in text
    assert "srun " in text and "--rdzv_endpoint=$HEAD:29400" in text and "--nproc_per_node=2" in text
    assert text.count("job.json") == 2 and all(p.is_file() for p in tmp_path.rglob("job.json"))
    emulated = parse_scenario(dict(name="e", nodes=4, methods=["ring"]))
    cpu = slurm_script(emulated, tmp_path / "e")
    assert "#SBATCH --nodes=4" in cpu and "--gpus-per-node" not in cpu


def test_netem_leaves_become_fifos_where_the_kernel_has_no_netem():
    cmds = [["tc", "qdisc", "replace", "dev", "eth0", "parent", "1:101", "handle", "101:", "netem", "rate", "100mbit"],
            ["tc", "class", "replace", "dev", "eth0", "parent", "1:", "classid", "1:101", "htb", "rate", "100mbit"]]
    out = _rate_only(cmds)
    assert out[0][-4:] == ["101:", "pfifo", "limit", "1000"] and out[1] == cmds[1]


def test_preflight_problems_are_all_reported_at_once():
    s = hosts(["10.0.0.1", "10.0.0.1", "10.0.0.2", "10.0.0.2"])
    local = {"python": "3.11.2", "compactbed": "0.1.0", "torch": "2.13.0"}
    a, b = (Host(i, s.nodes[m[0]], m, s.remote) for i, m in enumerate(s.machines))
    a.report = dict(local, tc="/usr/sbin/tc", netem=True, gpus=2, clock_offset_s=0.01)
    b.report = dict(local, torch="2.12.0", tc=None, netem=False, gpus=1, clock_offset_s=9.0)
    found = problems([a, b], local, shaping=True, needs_netem=True)
    said = " | ".join(p for _, p in found)
    assert all(h == b.name for h, _ in found)
    for expected in ("torch 2.12.0 (coordinator: 2.13.0)", "2 ranks but 1 GPUs", "no tc", "no sch_netem",
                     "clock +9.0 s off"):
        assert expected in said
    assert problems([a], local, shaping=False, needs_netem=True) == []
    b.report = {"error": "No module named compactbed"}
    assert "cannot run the preflight: No module named compactbed" in problems([b], local, True, False)[0][1]


def test_emit_writes_scripts_and_refuses_a_plan_without_hosts(repo, tmp_path, capsys):
    assert main(["run", str(repo / "scenarios" / "edge_4node.yaml"), "--emit", "slurm", "--output",
                 str(tmp_path)]) == 0
    (script,) = tmp_path.rglob("edge_4node.sbatch")
    assert script.read_text().startswith("#!/bin/bash") and "srun" in script.read_text()
    assert main(["run", str(repo / "scenarios" / "edge_4node.yaml"), "--emit", "plan", "--output",
                 str(tmp_path)]) == 1
    assert "--emit plan is for the hosts form" in capsys.readouterr().err
    assert main(["run", str(repo / "scenarios" / "hosts_example.yaml"), "--emit", "plan", "--output",
                 str(tmp_path)]) == 0
    assert list(tmp_path.rglob("hosts_plan.sh"))
