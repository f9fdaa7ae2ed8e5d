"""A small calibration and scenario helpers shared by the simulator's unit tests."""

from compactbed.scenarios.schema import METHOD_PRESETS, parse_scenario
from compactbed.simulator.costs import Calibration, DeviceProfile
from compactbed.simulator.model import Simulator, cluster_of
from compactbed.simulator.workload import workload_of

CALIB = Calibration(devices={"cpu": DeviceProfile(a=1e-4, b=1e-11, c=1e-11, step_overhead_s=1e-3, cores=2)},
                    codec={"1bit/encode": (1e-5, 1e-10), "1bit/decode": (1e-5, 5e-11),
                           "2bit/encode": (1e-5, 1.2e-10), "2bit/decode": (1e-5, 6e-11)},
                    hop_rtt_factor=1.0, hop_bandwidth_factor=1.0, hop_overhead_s=1e-3)


def sc(**kw):
    """A 4-node star whose paths are 100 Mbit/s + 10 ms one-way (access links of 5 ms), overridden by ``kw``."""
    data = dict(name="s", nodes=4, link={"rate_mbit": 100, "delay_ms": 5}, labels=32, steps=10, guidance=1.0,
                methods=["ring", "patch", "distrifusion", "compact-1bit", "compact-2bit"]) | kw
    return parse_scenario(data, "s")


def run(scenario, method, **cluster_kw):
    return Simulator(workload_of(scenario, METHOD_PRESETS[method]), cluster_of(scenario, **cluster_kw), CALIB).run()
