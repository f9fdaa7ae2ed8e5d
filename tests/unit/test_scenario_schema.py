"""The scenario schema: shipped files validate; bad files fail with a message naming the field."""

import pytest

from compactbed.netem.profiles import LinkSpec, named_profiles, resolve_link
from compactbed.scenarios.schema import METHOD_PRESETS, ScenarioError, load_scenario, parse_recorded, parse_scenario

BASE = dict(name="t", nodes=4, methods=["ring", "compact-1bit"])


def parse(**overrides):
    return parse_scenario(BASE | overrides, "t.yaml")


def error_of(**overrides) -> str:
    with pytest.raises(ScenarioError) as e:
        parse(**overrides)
    return str(e.value)


def test_every_shipped_scenario_validates(repo):
    files = sorted((repo / "scenarios").glob("*.yaml"))
    assert files, "no scenarios shipped"
    for f in files:
        s = load_scenario(f)
        assert s.world_size >= 1 and s.methods


def test_edge_4node_is_what_the_issue_describes(repo):
    s = load_scenario(repo / "scenarios" / "edge_4node.yaml")
    assert s.world_size == 4
    link = s.link_between(0, 3)
    assert (link.rate_mbit, link.delay_ms) == (100, 10)
    names = [m.name for m in s.methods]
    assert {"ring", "patch", "distrifusion", "compact-1bit", "compact-1bit-direct", "compact-2bit-direct"} <= set(names)
    assert s.warmup.mode == "local"


def test_node_count_expands_and_presets_resolve():
    s = parse()
    assert [n.name for n in s.nodes] == ["node0", "node1", "node2", "node3"]
    assert s.methods[1].codec.compressor.kind == "1bit" and s.methods[1].codec.residual == "ef"
    assert s.methods[0].codec is None and not s.methods[0].compressed


def test_custom_method_mapping():
    s = parse(methods=[{"name": "lr16", "comm": "patch",
                        "codec": {"compressor": {"kind": "lowrank", "rank": 16, "int4": True}}}])
    c = s.methods[0].codec.compressor
    assert (c.kind, c.rank, c.int4, s.methods[0].comm) == ("lowrank", 16, True, "patch")


def test_link_resolution_profile_override_and_per_link():
    s = parse(link={"profile": "wifi", "delay_ms": 7},
              nodes=[{"name": "a"}, {"name": "b", "link": "satellite"}, {"name": "c"}, {"name": "d"}],
              links=[{"src": "a", "dst": 2, "rate_mbit": 5}])
    wifi = named_profiles()["wifi"]
    assert s.link.delay_ms == 7 and s.link.rate_mbit == wifi.rate_mbit and s.link.jitter_ms == wifi.jitter_ms
    sat = named_profiles()["satellite"]
    assert s.link_between(0, 2).rate_mbit == 5 and s.own_paths() == [(0, 2)]     # explicit override: its own path
    # a star: the sender's access link, then the receiver's (delays and jitters add, losses combine)
    for path in (s.link_between(1, 0), s.link_between(0, 1)):
        assert path.delay_ms == sat.delay_ms + 7 and path.jitter_ms == sat.jitter_ms + wifi.jitter_ms
        assert path.rate_mbit == min(sat.rate_mbit, wifi.rate_mbit)
        assert path.loss_pct == pytest.approx(100 * (1 - (1 - sat.loss_pct / 100) * (1 - wifi.loss_pct / 100)))
    assert s.link_between(2, 3).delay_ms == 14 and s.access_links()[1] == sat
    # probes: each uplink and downlink on a path another access link does not slow (b's satellite link is the
    # slowest, so a's uplink is probed to d, not b; a -> c is shaped on its own, probed as such, so c's downlink
    # from d)
    assert s.probe_paths() == [(0, 1), (0, 2), (0, 3), (1, 2), (2, 3), (3, 0), (3, 2)]
    assert parse(nodes=8).probe_paths() == [(k, (k + 1) % 8) for k in range(8)]       # a uniform star: a cycle
    assert [x.rate_mbit for x in s.access_links(unlimited_rate=True)] == [None] * 4
    # a mesh (and every results folder recorded before access links): the sender's link, else the receiver's
    m = s.model_copy(update={"topology": "mesh"})
    assert m.link_between(1, 0) == sat and m.link_between(0, 1) == sat and m.link_between(2, 0) == s.link
    assert m.access_links() is None and len(m.probe_paths()) == 12
    assert parse_recorded(s.model_dump(mode="json")).topology == "star"
    old = {k: v for k, v in s.model_dump(mode="json").items() if k not in ("topology", "congestion_control")}
    assert (parse_recorded(old).topology, parse_recorded(old).congestion_control) == ("mesh", "host")


def test_usp_degrees_must_multiply_to_node_count():
    assert "ulysses_degree x ring_degree" in error_of(methods=["usp"], parallel={"ulysses_degree": 3})
    s = parse(methods=["usp", "ring", "ulysses"], parallel={"ulysses_degree": 2})
    assert [s.degrees(m) for m in s.methods] == [(2, 2), (1, 4), (4, 1)]


def test_cfg_parallel_halves_the_sequence_parallel_group():
    s = parse(nodes=8, methods=["cfg", "compact-1bit-cfg", "usp"],
              parallel={"cfg_degree": 2, "ulysses_degree": 2})
    assert [(s.cfg_degree(m), s.degrees(m)) for m in s.methods] == [(2, (1, 4)), (2, (1, 4)), (2, (2, 2))]
    assert parse(nodes=16, methods=["ring"]).degrees(METHOD_PRESETS["ring"]) == (1, 16)   # 4 label tokens unsplit
    assert "36 image tokens must divide by the sequence-parallel degree 8" in error_of(nodes=8, resolution=12)
    assert "node count must be even" in error_of(nodes=3, methods=["cfg"])
    assert "only one pass per step" in error_of(nodes=2, methods=["cfg"], guidance=1.0)
    assert "2 x 2 x 2 must equal the node count 4" in \
        error_of(methods=["usp"], parallel={"cfg_degree": 2, "ulysses_degree": 2, "ring_degree": 2})
    assert "parallel.cfg_degree" in error_of(methods=[{"name": "u", "comm": "usp", "cfg_parallel": True}])


def test_the_video_model_takes_frames_and_runs_xdits_sequence_parallelism():
    video = {"name": "tiny_cogvideox"}
    s = parse(nodes=8, model=video, frames=4, methods=["ring", "compact-1bit"], warmup={"mode": "sync"})
    assert s.degrees(s.methods[0]) == (1, 8)
    assert "not patch, DistriFusion or PipeFusion" in error_of(model=video, methods=["patch"])
    assert "warms up in warmup mode 'sync'" in error_of(model=video, methods=["compact-1bit"], warmup={"mode": "local"})
    assert "no height" in error_of(model=video, height=8)
    assert "frames and height are for predictions" in error_of(frames=4)


def test_pipefusion_is_checked_against_the_tiny_models_layers_and_the_runtimes_pipeline(tmp_path):
    from compactbed.testbed.run import checked_model

    s = parse(nodes=4, methods=["pipefusion", {"name": "pf2", "comm": "pipefusion", "patches": 2}])
    assert [m.pipelined for m in s.methods] == [True, True] and s.degrees(s.methods[0]) == (1, 1)
    assert "at least one of the tiny model's 4 layers" in error_of(nodes=8, methods=["pipefusion"])
    assert "patches is for comm 'pipefusion'" in error_of(methods=[{"name": "x", "comm": "ring", "patches": 2}])
    hybrid = parse(nodes=8, methods=["pipefusion"], parallel={"pipefusion_degree": 2, "ulysses_degree": 2})
    assert (hybrid.stages(hybrid.methods[0]), hybrid.degrees(hybrid.methods[0])) == (2, (2, 2))
    assert "3 x 1 x 1 must equal the node count 4" in error_of(methods=["pipefusion"],
                                                               parallel={"pipefusion_degree": 3})
    assert "warmup.steps must be at least 1" in error_of(methods=["pipefusion"], warmup={"steps": 0})
    with pytest.raises(ScenarioError, match="method pipefusion: PipeFusion .* no classifier-free guidance batch"):
        checked_model(s)                                    # guidance 1.5: xDiT's Flux pipeline has no CFG batch
    checked_model(s.model_copy(update={"guidance": 1.0}))


@pytest.mark.parametrize("overrides, field, hint", [
    (dict(methods=["tribit"]), "methods", "presets: ring"),
    (dict(methods=[{"name": "x", "comm": "carrier-pigeon"}]), "methods.0.comm", "'ring'"),
    (dict(methods=[{"name": "x", "comm": "ring", "codec": {"compressor": {"kind": "3bit"}}}]),
     "methods.0.codec.compressor.kind", "'1bit'"),
    (dict(link="fiber_to_mars"), "link", "known: "),
    (dict(link={"rate_mbit": -5}), "link.rate_mbit", "greater than 0"),
    (dict(link={"loss_pct": 100}), "link.loss_pct", "less than 100"),
    (dict(nodes=0), "nodes", "between 1 and"),
    (dict(nodes=10**9), "nodes", "between 1 and"),
    (dict(steps=10**7), "steps", "less than or equal to 1000"),
    (dict(resolution=17), "resolution", "resolution must be even"),
    (dict(resolution=15), "resolution", "2x2 patches"),
    (dict(link={"delay_ms": 5, "jitter_ms": 50}), "link", "jitter 50 ms exceeds the delay 5 ms"),
    (dict(nodes=65), "<top>", "at most 64 emulated nodes"),
    (dict(labels=[3, 12]), "labels", "digit classes 0-9"),
    (dict(output="../../etc"), "output", "relative path"),
    (dict(output="/etc/cron.d"), "output", "relative path"),
    (dict(warmup={"mode": "lazy"}), "warmup.mode", "'sync' or 'local'"),
    (dict(unknown_key=1), "unknown_key", "Extra inputs are not permitted"),
    (dict(links=[{"src": 0, "dst": 9, "rate_mbit": 1}]), "<top>", "not one of the 4 nodes"),
    (dict(methods=["ring", "ring"]), "<top>", "repeated: ring"),
    (dict(methods=[{"name": "s", "comm": "ring", "codec": {"compressor": {"kind": "sparse", "keep": 4}}}]),
     "methods.0.codec.compressor", "keep (4) must be smaller than group (4)"),
])
def test_bad_fields_are_named_with_allowed_values(overrides, field, hint):
    msg = error_of(**overrides)
    assert msg.startswith("t.yaml: ")
    line = next((l for l in msg.splitlines()[1:] if l.startswith(field + ":")), None) or msg
    assert field in msg and hint in line, msg


def test_yaml_level_problems(tmp_path):
    cases = {
        "tag.yaml": "name: !!python/object/apply:os.system ['true']\n",
        "broken.yaml": "name: [unclosed\n",
        "list.yaml": "- 1\n- 2\n",
    }
    for name, text in cases.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(ScenarioError) as e:
            load_scenario(tmp_path / name)
        assert str(e.value).startswith(str(tmp_path / name))
    with pytest.raises(ScenarioError, match="no such scenario file"):
        load_scenario(tmp_path / "missing.yaml")
    big = tmp_path / "big.yaml"
    big.write_text("# " + "x" * 1_100_000)
    with pytest.raises(ScenarioError, match="larger than"):
        load_scenario(big)


def test_profiles_are_valid_and_complete():
    p = named_profiles()
    for required in ["datacenter_10g", "ethernet_1g", "ethernet_100m", "wifi", "5g", "wan", "satellite"]:
        assert isinstance(p[required], LinkSpec)
    assert p["unlimited"].rate_mbit is None and p["unlimited"].rate_bytes_per_s is None
    assert p["ethernet_100m"].rate_bytes_per_s == 12.5e6
    assert resolve_link({"rate_mbit": 3}).delay_ms == 0


def test_presets_cover_the_methods_the_issues_name():
    kinds = {m.codec.compressor.kind for m in METHOD_PRESETS.values() if m.codec}
    assert kinds == {"1bit", "2bit", "lowrank", "sparse"}
    residuals = {m.codec.residual for m in METHOD_PRESETS.values() if m.codec}
    assert residuals == {"ef", "no_ef", "naive"}
    assert {m.comm for m in METHOD_PRESETS.values()} == {"ring", "ulysses", "usp", "patch", "distrifusion", "pipefusion"}


def test_hostile_files_end_with_a_clear_error(tmp_path, report):
    bomb = ["name: bomb", "nodes: 2", "methods: [ring]", "a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    bomb += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 9)] + ["labels: *a8"]
    cases = {
        "bomb.yaml": ("\n".join(bomb), "aliases"),
        "huge.yaml": ("name: h\nnodes: 2\nmethods: [ring]\nlabels: 1000000\n", "label count"),
        "names.yaml": ("name: h\nnodes: [{name: '../../etc'}, {name: b}]\nmethods: [ring]\n", "nodes.0.name"),
        "dots.yaml": ("name: h\nnodes: 2\nmethods: [ring]\noutput: results/../../x\n", "relative path"),
        "binary.yaml": (b"\xff\xfe\x00bad", "UTF-8"),
    }
    for name, (text, hint) in cases.items():
        path = tmp_path / name
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
        with pytest.raises(ScenarioError, match=hint) as e:
            load_scenario(path)
        report(f"hostile scenario {name}: refused with '{str(e.value).splitlines()[-1][:100]}'")


def test_a_value_is_quoted_once():
    msg = error_of(nodes=0)
    assert msg.count("got 0") == 1, msg


def test_an_unreadable_file_is_a_scenario_error(tmp_path, monkeypatch):
    path = tmp_path / "s.yaml"
    path.write_text("name: s\n")

    def denied(self, *a, **kw):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(type(path), "read_text", denied)
    with pytest.raises(ScenarioError, match="cannot be read \\(Permission denied\\)"):
        load_scenario(path)


def test_output_gather_default_per_model_and_for_recorded_folders():
    """Sharded latents (one gather at the end) by default; xDiT's gather every step for video models, PipeFusion,
    ``output_gather: step`` and folders recorded before the setting existed."""
    ring, pf = METHOD_PRESETS["ring"], METHOD_PRESETS["pipefusion"]
    s = parse(guidance=1.0, methods=["ring", "pipefusion"])
    assert not s.gathers_each_step(ring) and s.gathers_each_step(pf)
    assert parse(output_gather="step").gathers_each_step(ring)
    video = dict(model={"name": "tiny_cogvideox"}, frames=4)
    assert parse(**video).gathers_each_step(ring)
    with pytest.raises(ScenarioError, match="gathers every step"):
        parse(**video, output_gather="end")
    old = {k: v for k, v in s.model_dump(mode="json").items() if k != "output_gather"}
    assert parse_recorded(old).gathers_each_step(ring)
    assert not parse_recorded(s.model_dump(mode="json")).gathers_each_step(ring)
