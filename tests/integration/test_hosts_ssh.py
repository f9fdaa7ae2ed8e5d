"""The hosts form over real SSH: an OpenSSH server in each of two emulated namespaces (each host with its own work
folder), the coordinator in a third. A shaped run matches an emulated run of the same scenario in bytes and PSNR
and leaves nothing behind; a host lost mid-run is a clear error and the other host is cleaned up."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from compactbed.netem.cluster import EmulatedCluster, check_backend
from compactbed.netem.profiles import LinkSpec

pytestmark = [pytest.mark.root, pytest.mark.slow]
CHECK = check_backend() if os.geteuid() == 0 else None
SSHD = shutil.which("sshd") or "/usr/sbin/sshd"
needs = pytest.mark.skipif(CHECK is None or CHECK.backend is None or not Path(SSHD).is_file(),
                           reason="needs root, link emulation and openssh-server (apt-get install openssh-server)")
PORT = 2222
SCENARIO = dict(name="hosts_ssh", labels=8, steps=3, guidance=1.0, methods=["ring", "compact-1bit"],
                warmup={"mode": "local", "steps": 1}, link={"rate_mbit": 200}, timeout_s=20)


def _keys(tmp: Path, hosts: int) -> tuple[Path, Path]:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp / "client")], check=True)
    known = []
    for k in range(hosts):
        d = tmp / f"sshd{k}"
        d.mkdir()
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / "host_key")], check=True)
        shutil.copy(tmp / "client.pub", d / "authorized_keys")
        (d / "config").write_text(
            f"Port {PORT}\nListenAddress 198.18.{k}.2\nHostKey {d / 'host_key'}\nAuthorizedKeysFile "
            f"{d / 'authorized_keys'}\nPidFile {d / 'sshd.pid'}\nUsePAM no\nStrictModes no\nPermitRootLogin yes\n"
            "PasswordAuthentication no\nKbdInteractiveAuthentication no\nSubsystem sftp internal-sftp\n")
        known.append(f"[198.18.{k}.2]:{PORT} " + " ".join((d / "host_key.pub").read_text().split()[:2]))
    (tmp / "known_hosts").write_text("\n".join(known) + "\n")
    return tmp / "client", tmp / "known_hosts"


def _hosts_scenario(tmp: Path, key: Path, known: Path) -> Path:
    data = dict(SCENARIO, nodes=[{"name": f"h{k}", "host": f"198.18.{k}.2", "interface": "nfv", "ssh_port": PORT,
                                  "ssh_key": str(key)} for k in range(2)],
                remote={"python": sys.executable, "workdir": str(tmp / "remote"), "known_hosts": str(known)},
                output=str(tmp.name))
    path = tmp / "hosts.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _summary(folder: Path) -> dict:
    (res,) = [p for p in folder.iterdir() if p.is_dir()]
    data = json.loads((res / "summary.json").read_text())
    return {(r["links"], r["method"]): r for r in data["rows"]}, data, res


@needs
def test_hosts_form_runs_over_ssh_like_emulation_and_cleans_up(tmp_path, report):
    # the same scenario emulated, for bytes and quality
    emu = tmp_path / "emulated.yaml"
    emu.write_text(yaml.safe_dump(dict(SCENARIO, nodes=2)))
    subprocess.run([sys.executable, "-m", "compactbed.testbed.cli", "run", str(emu), "--output",
                    str(tmp_path / "emu"), "--no-bound", "--no-ideal"], check=True, capture_output=True)
    emulated, _, _ = _summary(tmp_path / "emu")
    key, known = _keys(tmp_path, 2)
    scenario = _hosts_scenario(tmp_path, key, known)
    links = {(s, d): LinkSpec() for s in range(3) for d in range(3) if s != d}
    with EmulatedCluster(3, links, CHECK.backend) as cluster:
        Path("/run/sshd").mkdir(exist_ok=True)
        for k in range(2):
            subprocess.run([*cluster.prefix(k), SSHD, "-f", str(tmp_path / f"sshd{k}" / "config")], check=True)
        coordinator = [*cluster.prefix(2), sys.executable, "-m", "compactbed.testbed.cli", "run", str(scenario),
                       "--output", str(tmp_path / "hosts")]
        done = subprocess.run(coordinator, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        assert "hosts (preflight)" in done.stdout
        rows, summary, res = _summary(tmp_path / "hosts")
        assert summary["state"]["state"] == "complete"
        assert {links for links, _ in rows} == {"shaped", "bound", "ideal"}
        for method in SCENARIO["methods"]:
            got, want = rows[("shaped", method)], emulated[("shaped", method)]
            assert got["bytes_on_wire"] == want["bytes_on_wire"] > 0
            assert got["quality"]["psnr_db"] == pytest.approx(want["quality"]["psnr_db"], abs=1e-6)
        env = json.loads((res / "environment.json").read_text())
        assert env["link_mode"].startswith("hosts (") and len(env["hosts"]) == 2
        assert {p.name for p in (res / "shaped" / "ring" / "seed0").iterdir()} >= {"rank0.jsonl", "rank1.jsonl",
                                                                                    "run.json", "images.npy"}
        # nothing left: work folders, qdiscs, processes (only the two sshd listeners)
        assert not any((tmp_path / "remote").rglob("job.json"))
        for k in range(2):
            qdisc = subprocess.run([*cluster.prefix(k), "tc", "qdisc", "show", "dev", "nfv"], capture_output=True,
                                   text=True).stdout
            assert "htb" not in qdisc, qdisc
        report(f"hosts form over SSH: ring and compact-1bit on 2 hosts match emulation in bytes and PSNR "
               f"({rows[('shaped', 'compact-1bit')]['quality']['psnr_db']:.2f} dB)")

        # a host lost mid-run: every process in its namespace killed (its sshd included)
        proc = subprocess.Popen(coordinator, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env=dict(os.environ, PYTHONUNBUFFERED="1"))
        out = []
        t0 = time.monotonic()
        for line in proc.stdout:
            out.append(line)
            if "step 1/" in line:
                break
            assert time.monotonic() - t0 < 300, "".join(out)
        pids = subprocess.run(["ip", "netns", "pids", cluster.names.node(1)], capture_output=True,
                              text=True).stdout.split()
        for pid in pids:
            os.kill(int(pid), signal.SIGKILL)
        t_kill = time.monotonic()
        rest, _ = proc.communicate(timeout=300)
        text = "".join(out) + rest
        assert proc.returncode != 0, text[-3000:]
        assert "host 1" in text and ("lost" in text or "timed out" in text), text[-3000:]
        elapsed = time.monotonic() - t_kill
        assert elapsed < SCENARIO["timeout_s"] * 4 + 90, elapsed
        left = subprocess.run(["ip", "netns", "pids", cluster.names.node(0)], capture_output=True,
                              text=True).stdout.split()
        sshd0 = (tmp_path / "sshd0" / "sshd.pid").read_text().strip()
        assert left == [sshd0], left
        assert "htb" not in subprocess.run([*cluster.prefix(0), "tc", "qdisc", "show", "dev", "nfv"],
                                           capture_output=True, text=True).stdout
        assert not list((tmp_path / "remote").glob("*/host0"))
        report(f"hosts form: host 1 killed mid-run, error after {elapsed:.0f} s, host 0 cleaned up")
        os.kill(int(sshd0), signal.SIGTERM)
