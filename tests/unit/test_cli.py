"""The `scenario` console script: help for every subcommand, one-line errors with non-zero exits."""

import subprocess
import sys

import pytest

from compactbed.testbed.cli import build_parser, main

SUBCOMMANDS = ["run", "validate", "predict", "published", "simcheck", "regress", "calibrate", "crossval", "dashboard",
               "netem"]


def test_help_lists_and_explains_every_subcommand(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for cmd in SUBCOMMANDS:
        assert cmd in out
    for cmd in SUBCOMMANDS:
        with pytest.raises(SystemExit):
            main([cmd, "--help"])
        assert capsys.readouterr().out.strip().startswith("usage: scenario " + cmd)


def test_validate_ok(repo, capsys):
    assert main(["validate", str(repo / "scenarios" / "edge_4node.yaml")]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "edge_4node, 4 nodes, access link 100 Mbit/s, 5 ms (node to node 100 Mbit/s, 10 ms)" in out


def test_gpu_scenarios_are_validated_predicted_and_published_sets_printed(repo, capsys):
    gpu = str(repo / "scenarios" / "gpu_2x8_h100.yaml")
    assert main(["validate", gpu]) == 0
    assert "predicted on h100-sxm on 2 machines over nvlink4, NIC ethernet_25g" in capsys.readouterr().out
    assert main(["predict", gpu, "--device", "l40s"]) == 0
    out = capsys.readouterr().out
    assert "l40s on 2 machines" in out and "compact-1bit" in out
    assert main(["predict", gpu, "--device", "b300"]) == 2
    assert "no device profile 'b300'" in capsys.readouterr().err
    assert main(["published", "compactfusion_pcie"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "source: CompactFusion (arXiv 2507.17511) Table 1" in out and "fastest: published compact-1bit" in out
    assert main(["published", "xdit_flux_h100", "xdit_flux_h100_rerun"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "xdit_flux_h100_rerun publishes 5 rows of xdit_flux_h100's configuration anew: latency +15%" in out
    assert main(["published", "nope"]) == 1
    assert "no published set nope; known: compactfusion_pcie" in capsys.readouterr().err


def test_predict_can_probe_this_host_for_its_pace_and_exchange_floor(repo, tmp_path, capsys):
    """--probe-host times this machine's reference generation (its pace, which scales compute) and its exchanges
    beside the scenario's computing ranks (the tiny model, 2 ranks), priced at no less; a GPU scenario refuses it."""
    f = tmp_path / "lan.yaml"
    f.write_text("name: lan\nnodes: 2\nlink: ethernet_1g\nlabels: 2\nsteps: 4\nmethods: [ring]\n")
    assert main(["predict", str(f)]) == 0
    plain = capsys.readouterr().out
    assert main(["predict", str(f), "--probe-host"]) == 0
    out = capsys.readouterr().out
    assert "host probe: an exchange beside 2 computing ranks adds" in out and "ring" in out
    host = float(out.split("the calibration host's time")[0].rsplit(",", 1)[1].strip().rstrip("x"))
    assert 0.2 < host < 20

    def ring(text, column):
        return float(next(line for line in text.splitlines() if "│ ring" in line).split("│")[column])
    compute, comm = 7, 8
    assert ring(out, compute) == pytest.approx(host * ring(plain, compute), rel=0.05, abs=0.01)
    assert ring(out, comm) > ring(plain, comm)
    assert main(["predict", str(repo / "scenarios" / "gpu_2x8_h100.yaml"), "--probe-host"]) == 1
    assert "--probe-host measures this machine as the emulation host" in capsys.readouterr().err


def test_bad_scenario_one_reason_exit_2(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nnodes: 2\nmethods: [ring]\nsteps: -3\n")
    assert main(["validate", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "steps: Input should be greater than or equal to 1" in err
    assert "Traceback" not in err


def test_missing_file_and_missing_results(tmp_path, capsys):
    assert main(["validate", str(tmp_path / "nope.yaml")]) == 2
    assert main(["calibrate", str(tmp_path / "no_results")]) == 1
    err = capsys.readouterr().err
    assert "no such scenario file" in err and "no such results folder" in err


def test_crossval_refuses_bad_input_with_one_reason(tmp_path, capsys):
    assert main(["crossval", str(tmp_path / "no_results")]) == 1
    assert main(["crossval", str(tmp_path), "--codec-from", str(tmp_path)]) == 1
    assert main(["crossval", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "no such results folder" in err and f"no codec.csv in {tmp_path}" in err and "at least two" in err
    assert "Traceback" not in err


def test_console_script_is_installed_and_exits_nonzero_on_error(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nnodes: 2\nmethods: [ring]\nbogus: true\n")
    r = subprocess.run([sys.executable, "-m", "compactbed.testbed.cli", "validate", str(bad)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert "bogus: Extra inputs are not permitted" in r.stderr and "Traceback" not in r.stderr


def test_unknown_subcommand_is_a_usage_error():
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["fly"])
    assert e.value.code == 2


@pytest.mark.parametrize("path, reason", [("nowhere", "no such folder"), ("empty", "not a model folder")])
def test_validate_checks_the_model_folder(tmp_path, capsys, path, reason):
    (tmp_path / "empty").mkdir()
    sc = tmp_path / "s.yaml"
    sc.write_text(f"name: s\nnodes: 2\nmethods: [ring]\nmodel: {{path: {tmp_path / path}}}\nprompts: [a fox]\n")
    assert main(["validate", str(sc)]) == 2
    err = capsys.readouterr().err
    assert reason in err and "s.yaml" in err and "Traceback" not in err


def test_validate_names_the_conditions_a_model_folder_expects(tmp_path, capsys):
    from compactbed.runtime.tiny_model import TINY_MODEL_DIR

    sc = tmp_path / "s.yaml"
    sc.write_text(f"name: s\nnodes: 2\nmethods: [ring]\nmodel: {{path: {TINY_MODEL_DIR}}}\nlabels: 4\n")
    assert main(["validate", str(sc)]) == 0
    sc.write_text(f"name: s\nnodes: 2\nmethods: [ring]\nmodel: {{path: {TINY_MODEL_DIR}}}\nprompts: [a fox]\n")
    assert main(["validate", str(sc)]) == 2
    assert "conditioned on labels" in capsys.readouterr().err
