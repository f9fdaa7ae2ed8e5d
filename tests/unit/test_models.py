"""Model folders load through diffusers' own code behind one adapter: the shipped tiny digit model, and a
FluxPipeline folder (a real checkpoint's layout; here a random tiny one built offline) whose sampling must
equal ``FluxPipeline.__call__`` itself."""

import json
import shutil

import pytest
import torch

from compactbed.runtime.models import (FluxPipelineModel, ModelFolderError, TinyDigits, check_conditions,
                                       load_model)
from compactbed.runtime.sampling import sample_reference
from compactbed.runtime.tiny_model import TINY_MODEL_DIR
from compactbed.simulator.workload import folder_shape
from compactbed.scenarios.schema import ScenarioError, parse_scenario

from ..flux_pipeline import build_flux_pipeline

PROMPTS = ["a photo of a cat on the moon", "red city street at night"]


@pytest.fixture(scope="module")
def pipe_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipes")
    return {ge: build_flux_pipeline(root / f"flux-ge{int(ge)}", guidance_embeds=ge) for ge in (False, True)}


def test_shipped_folder_and_a_copy_load_identically(tmp_path):
    shutil.copytree(TINY_MODEL_DIR, tmp_path / "copy")
    a, b = load_model(), load_model(tmp_path / "copy")
    assert isinstance(a, TinyDigits) and a.classifier is not None and a.condition_kind == "labels"
    assert all(torch.equal(x, y) for x, y in zip(a.transformer.parameters(), b.transformer.parameters()))


def test_incomplete_or_foreign_folders_say_what_is_missing(tmp_path):
    shutil.copytree(TINY_MODEL_DIR / "transformer", tmp_path / "bare" / "transformer")
    with pytest.raises(ModelFolderError, match="a transformer without its pipeline.*model_index.json"):
        load_model(tmp_path / "bare")
    (tmp_path / "sd").mkdir()
    (tmp_path / "sd" / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    with pytest.raises(ModelFolderError, match="'StableDiffusionPipeline'; supported pipelines: FluxPipeline"):
        load_model(tmp_path / "sd")
    with pytest.raises(ModelFolderError, match="no such model folder"):
        load_model(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelFolderError, match="not a model folder"):
        load_model(tmp_path / "empty")


@pytest.mark.parametrize("distilled", [False, True])
def test_pipeline_sampling_equals_flux_pipeline_call(pipe_dirs, distilled):
    """Same prompts, seed, scheduler (dynamic shift) and guidance: our sampler reproduces the pipeline's
    decoded images; guidance is true CFG against the empty prompt, or the distilled guidance input."""
    from diffusers import FluxPipeline

    model = load_model(pipe_dirs[distilled], max_sequence_length=16)
    assert isinstance(model, FluxPipelineModel) and model.classifier is None
    assert model.cfg_scale(3.0) == (1.0 if distilled else 3.0)
    ours = sample_reference(model, PROMPTS, 128, 5, seed=3, guidance=3.0)
    pipe = FluxPipeline.from_pretrained(pipe_dirs[distilled])
    pipe.set_progress_bar_config(disable=True)
    kw = dict(guidance_scale=3.0) if distilled else dict(true_cfg_scale=3.0, negative_prompt=[""] * 2)
    theirs = pipe(PROMPTS, height=128, width=128, num_inference_steps=5, max_sequence_length=16, output_type="pt",
                  generator=torch.Generator().manual_seed(3), **kw).images * 2 - 1
    assert ours.shape == (2, 3, 128, 128)
    assert (ours - theirs).abs().max() < 1e-4
    other = sample_reference(model, [PROMPTS[1], PROMPTS[1]], 128, 5, seed=3, guidance=3.0)   # same noise
    assert (other[1] - ours[1]).abs().max() < 1e-4 and (other[0] - ours[0]).abs().max() > 1e-2


def test_conditions_and_layout_are_checked_against_the_model(pipe_dirs):
    model = load_model(pipe_dirs[False], max_sequence_length=16)
    with pytest.raises(ModelFolderError, match="conditioned on prompts, but the scenario gives labels"):
        check_conditions(model, [1, 2])
    check_conditions(model, PROMPTS)
    model.check_layout(128, 4, 4)                       # 64 image and 16 text tokens, 4 heads
    with pytest.raises(ModelFolderError, match="64 image tokens must divide by the sequence-parallel degree 3"):
        model.check_layout(128, 3)
    with pytest.raises(ModelFolderError, match="resolution 120 px must be a multiple of 16"):
        model.check_layout(120, 2)
    with pytest.raises(ModelFolderError, match="4 heads must divide by the Ulysses degree 8"):
        model.check_layout(256, 8, 8)
    with pytest.raises(ModelFolderError, match="conditioned on labels, but the scenario gives prompts"):
        check_conditions(load_model(), PROMPTS)


def test_folder_shape_reads_the_configs(pipe_dirs):
    s = folder_shape(pipe_dirs[True], "bfloat16", 16)
    assert (s.layers, s.hidden, s.heads, s.text_tokens, s.act_bytes, s.pixels_per_token, s.out_channels,
            s.guidance_embeds) == (4, 128, 4, 16, 2, 16, 16, True)
    t = folder_shape(TINY_MODEL_DIR)
    assert (t.layers, t.hidden, t.text_tokens, t.pixels_per_token, t.out_channels) == (4, 128, 4, 2, 4)


def test_schema_prompts_need_a_model_folder():
    base = dict(name="p", nodes=2, methods=["ring"])
    with pytest.raises(ScenarioError, match="prompts condition a pipeline folder"):
        parse_scenario(base | dict(prompts=["a cat"]))
    sc = parse_scenario(base | dict(prompts=["a cat", "a dog", "a horse"], model={"path": "/models/flux"}))
    assert sc.images == 3 and sc.conditions == ["a cat", "a dog", "a horse"]
    assert parse_scenario(base | dict(labels=5)).conditions == [0, 1, 2, 3, 4]
    with pytest.raises(ScenarioError, match="labels .* or prompts .*, not both"):
        parse_scenario(base | dict(labels=2, prompts=["a cat"], model={"path": "/models/flux"}))
