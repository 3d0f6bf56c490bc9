"""Bad input and bad checkpoints raise clear exceptions that name the problem."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

import vitriton
from tests.encoders import models
from vitriton.parallel import CheckpointError


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return models.save(models.clip_model(), tmp_path_factory.mktemp("clip"))


@pytest.fixture(scope="module")
def clip(clip_dir):
    return vitriton.from_pretrained(clip_dir)


@pytest.mark.parametrize(
    ("pixels", "match"),
    [
        (torch.randn(1, 4, 40, 40), "4 channels; the config expects 3"),
        (torch.randn(1, 3, 48, 40), "48x40 does not match the config's 40x40"),
        (torch.randn(3, 40, 40), "must be 4-d"),
    ],
)
def test_bad_pixels(clip, pixels, match):
    with pytest.raises(ValueError, match=match):
        clip.vision_model(pixels)


@torch.no_grad()
def test_siglip_takes_any_size_with_the_config_patch_count():
    """transformers' SigLIP embeddings check no image size, only that the patches fit the position table
    (35 px with patch 7: 25); CLIP's insist on the config's size (above)."""
    hf = models.siglip_model().vision_model.eval()
    ours = vitriton.from_transformers(hf, dtype=torch.float32)
    same_grid = models.pixels(2, (39, 41), seed=1)  # 39 // 7 == 41 // 7 == 5
    err = (ours(same_grid).pooler_output - hf(same_grid).pooler_output).norm() / hf(same_grid).pooler_output.norm()
    assert err <= 1e-4
    with pytest.raises(ValueError, match="gives 30 patches of 7 pixels; the position table holds 25"):
        ours(models.pixels(1, (42, 35)))


@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_config_image_smaller_than_a_patch(family):
    """image_size < patch_size gives no patch: transformers' convolution refuses the config's own size, and its
    position table has no grid to interpolate; vitriton names both rather than running a tower of no patches."""
    cls, config_cls = {
        "clip": (transformers.CLIPVisionModel, transformers.CLIPVisionConfig),
        "siglip": (transformers.SiglipVisionModel, transformers.SiglipVisionConfig),
    }[family]
    vision = {**models.CLIP_VISION, "image_size": 5}
    ours = vitriton.from_transformers(cls(config_cls(**vision)).eval(), device="cpu")
    with pytest.raises(ValueError, match="image size 5x5 is smaller than one 8-pixel patch"):
        ours(models.pixels(1, 5))
    with pytest.raises(ValueError, match="position table holds no patch position to interpolate"):
        ours(models.pixels(1, 24), interpolate_pos_encoding=True)


def test_clip_text_without_eos_token_id():
    """CLIP's text pooling reads eos_token_id; a config without one (transformers fails with an AttributeError)
    raises naming it, and the layers before the last, which do not pool, still run."""
    hf = transformers.CLIPTextModel(transformers.CLIPTextConfig(**{**models.CLIP_TEXT, "eos_token_id": None}))
    ours = vitriton.from_transformers(hf.eval(), device="cpu")
    ids, mask = models.text(2, 6)
    with pytest.raises(ValueError, match="eos_token_id is None"):
        ours(ids, mask)
    assert ours(ids, mask, feature_layers=-2).pooler_output is None


@torch.no_grad()
def test_siglip_model_without_vision_head():
    """vision_use_head=False leaves no image embedding: the full model's forward raises naming it (transformers
    fails with an AttributeError) rather than returning None logits; the towers' outputs still come."""
    config = transformers.SiglipConfig(
        text_config=models.SIGLIP_TEXT, vision_config={**models.SIGLIP_VISION, "vision_use_head": False}
    )
    ours = vitriton.from_transformers(transformers.SiglipModel(config).eval(), device="cpu")
    ids, _ = models.text(2, 6)
    pixels = models.pixels(2, models.SIGLIP_VISION["image_size"])
    with pytest.raises(ValueError, match="vision_use_head=False"):
        ours(ids, pixels)
    assert ours.get_image_features(pixels).pooler_output is None
    assert ours(ids, pixels, feature_layers=-2).logits_per_image is None


def test_mlp_of_no_columns():
    """intermediate_size 0 (transformers' CLIP runs it, its MLP adding fc2's bias alone) is refused at loading,
    naming it, where the encoder failed on an empty reshape."""
    hf = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**{**models.CLIP_VISION, "intermediate_size": 0}))
    with pytest.raises(ValueError, match="intermediate_size is 0"):
        vitriton.from_transformers(hf.eval(), device="cpu")


def test_bad_text(clip):
    with pytest.raises(ValueError, match="token id 99 is outside the vocabulary of 99"):
        clip.text_model(torch.tensor([[1, 2, 99]]))
    with pytest.raises(ValueError, match="token id -1"):
        clip.text_model(torch.tensor([[1, -1, 3]]))
    with pytest.raises(ValueError, match="17 tokens; the position table holds 16"):
        clip.text_model(torch.ones(1, 17, dtype=torch.long))
    with pytest.raises(ValueError, match=r"input_ids has shape \(2, 0\); expected \(batch, seq\)"):
        clip.text_model(torch.ones(2, 0, dtype=torch.long))
    with pytest.raises(ValueError, match="attention_mask has shape"):
        clip.text_model(torch.ones(2, 5, dtype=torch.long), torch.ones(2, 4, dtype=torch.long))
    with pytest.raises(TypeError, match="integer"):
        clip.text_model(torch.ones(1, 5))


def test_missing_tensor_names_tensor_and_file(clip_dir, tmp_path):
    state = load_file(clip_dir / "model.safetensors")
    del state["vision_model.encoder.layers.1.mlp.fc2.weight"]
    save_file(state, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text((clip_dir / "config.json").read_text())
    with pytest.raises(
        CheckpointError, match=r"'vision_model\.encoder\.layers\.1\.mlp\.fc2\.weight' not found in .*model\.safetensors"
    ):
        vitriton.from_pretrained(tmp_path)


def test_wrong_shape_names_tensor_and_file(clip_dir, tmp_path):
    state = load_file(clip_dir / "model.safetensors")
    state["text_model.encoder.layers.0.self_attn.k_proj.weight"] = torch.randn(160, 150)
    save_file(state, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text((clip_dir / "config.json").read_text())
    with pytest.raises(
        CheckpointError,
        match=r"k_proj\.weight' in .*model\.safetensors has shape \(160, 150\); the config expects \(160, 160\)",
    ):
        vitriton.from_pretrained(tmp_path)


def test_no_config(tmp_path):
    with pytest.raises(CheckpointError, match="has no config.json"):
        vitriton.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        vitriton.from_pretrained(tmp_path / "nowhere")


def test_unknown_model_type(clip_dir, tmp_path):
    config = json.loads((clip_dir / "config.json").read_text())
    config["model_type"] = "bert"
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="unknown model_type 'bert'; vitriton loads clip, siglip"):
        vitriton.from_pretrained(tmp_path)


def test_corrupt_safetensors(clip_dir, tmp_path):
    (tmp_path / "config.json").write_text((clip_dir / "config.json").read_text())
    (tmp_path / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(CheckpointError, match="cannot read safetensors file .*model.safetensors"):
        vitriton.from_pretrained(tmp_path)


def test_no_weights(clip_dir, tmp_path):
    (tmp_path / "config.json").write_text((clip_dir / "config.json").read_text())
    with pytest.raises(CheckpointError, match="holds no safetensors weights"):
        vitriton.from_pretrained(tmp_path)


def test_a_model_holding_towers_names_them(clip_dir, tmp_path):
    """A checkpoint of a model vitriton does not implement that holds a CLIP/SigLIP tower (LLaVA) says which
    towers it holds and how to load one; one that holds none keeps the unknown model_type error."""
    vision = json.loads((clip_dir / "config.json").read_text())["vision_config"]
    config = {
        "model_type": "llava",
        "architectures": ["LlavaForConditionalGeneration"],
        "vision_config": {**vision, "model_type": "clip_vision_model"},
        "text_config": {"model_type": "llama"},
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    held = r"vitriton does not implement LlavaForConditionalGeneration; it holds a vision tower \(clip_vision_"
    with pytest.raises(
        ValueError, match=held + r"model\): pass tower='vision' to load one, or accelerate .* vitriton.patch"
    ):
        vitriton.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match=held):
        vitriton.from_pretrained(tmp_path, tower="text")
    config["vision_config"]["model_type"] = "pixtral"
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="unknown model_type 'llava'; vitriton loads clip, siglip"):
        vitriton.from_pretrained(tmp_path, tower="vision")


def test_wrong_class_and_tower(clip_dir):
    with pytest.raises(TypeError, match="holds a CLIPConfig .*, not a SiglipVisionConfig"):
        vitriton.SiglipVisionModel.from_pretrained(clip_dir)
    with pytest.raises(ValueError, match="tower='audio'"):
        vitriton.from_pretrained(clip_dir, tower="audio")
    with pytest.raises(ValueError, match="parallel='pipeline'"):
        vitriton.from_pretrained(clip_dir, parallel="pipeline")


def test_file_instead_of_directory(clip_dir):
    with pytest.raises(NotADirectoryError, match="is a file; pass the checkpoint directory"):
        vitriton.from_pretrained(clip_dir / "config.json")


def test_uncached_repo_id():
    with pytest.raises(FileNotFoundError, match="not in the local Hugging Face cache; vitriton needs a local"):
        vitriton.from_pretrained("no-such-owner/no-such-vitriton-model")


def test_nhwc_pixels(clip):
    with pytest.raises(ValueError, match=r"channel dimension looks last \(NHWC\).*permute\(0, 3, 1, 2\)"):
        clip.vision_model(torch.randn(1, 40, 40, 3))


@pytest.mark.parametrize("bad", ["-2", -2.0, True])
def test_feature_layers_types(clip, bad):
    with pytest.raises(TypeError, match=f"feature_layers={bad!r} is a {type(bad).__name__}; expected an int or a list"):
        clip.vision_model(models.pixels(1, 40), feature_layers=bad)


def test_4d_attention_mask(clip):
    mask = torch.ones(2, 1, 5, 5)
    with pytest.raises(ValueError, match=r"attention_mask has shape \(2, 1, 5, 5\), a 4-d .* pass the tokenizer's 2-d"):
        clip.text_model(torch.ones(2, 5, dtype=torch.long), mask)


@pytest.mark.parametrize("dtype", [torch.int8, "int8", "float128"])
def test_bad_dtype(clip_dir, dtype):
    with pytest.raises(ValueError, match="vitriton runs float32, float16 or bfloat16|names no torch dtype"):
        vitriton.from_pretrained(clip_dir, dtype=dtype)


def test_dtype_forms(clip_dir):
    assert vitriton.from_pretrained(clip_dir, dtype="bfloat16").logit_scale.dtype == torch.bfloat16
    assert vitriton.from_pretrained(clip_dir, dtype="torch.float16").logit_scale.dtype == torch.float16
    assert vitriton.from_pretrained(clip_dir, dtype="auto").logit_scale.dtype == torch.float32
    with pytest.warns(FutureWarning, match="torch_dtype is deprecated"):
        model = vitriton.from_pretrained(clip_dir, torch_dtype=torch.bfloat16)
    assert model.logit_scale.dtype == torch.bfloat16


@pytest.mark.parametrize(
    "dtype",
    [{"text_config": torch.float16, "vision_config": torch.float32, "": "bfloat16"}, {"text_config": "float16"}],
)
def test_dtype_per_sub_config_as_transformers(clip_dir, dtype):
    """transformers 5.17 takes a dict per sub-config but loads every module in its "" entry's dtype (the default
    dtype without one), and so does vitriton, warning that the other entries are not applied."""
    expected = transformers.CLIPModel.from_pretrained(clip_dir, dtype=dtype).dtype
    with pytest.warns(UserWarning, match="one dtype per sub-config is deprecated"):
        model = vitriton.from_pretrained(clip_dir, dtype=dtype)
    assert {p.dtype for p in model.parameters()} == {expected}


@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_auto_dtype_of_a_tower_is_the_stored_one(family, tmp_path):
    """transformers' default dtype="auto" reads the config's dtype, else the stored weights': a tower class loading
    a full fp16 checkpoint (whose vision_config names no dtype) gets fp16, as transformers' does."""
    hf = models.clip_model() if family == "clip" else models.siglip_model()
    models.save(hf.half(), tmp_path)
    tower = "CLIPVisionModel" if family == "clip" else "SiglipVisionModel"
    expected = getattr(transformers, tower).from_pretrained(tmp_path).dtype
    assert expected == torch.float16
    assert getattr(vitriton, tower).from_pretrained(tmp_path).dtype == expected
    assert vitriton.from_pretrained(tmp_path, tower="text", dtype="auto").dtype == expected
    assert vitriton.from_pretrained(tmp_path, tower="vision", dtype=torch.float32).dtype == torch.float32


@pytest.mark.parametrize("name", ["CLIPModel", "CLIPVisionModel"])
def test_loaded_config_as_transformers(clip_dir, name):
    """The model's config records the dtype loaded (its sub-configs too) and the path, as transformers' does, on
    a copy of a config object given."""
    given = transformers.AutoConfig.from_pretrained(clip_dir)
    if name == "CLIPVisionModel":
        given = given.vision_config
    before = given.to_dict()
    expected = getattr(transformers, name).from_pretrained(clip_dir, config=given, dtype="float16").config
    model = getattr(vitriton, name).from_pretrained(clip_dir, config=given, dtype="float16")
    assert model.config is not given and given.to_dict() == before
    assert model.config.name_or_path == expected.name_or_path == str(clip_dir)
    subs = [(getattr(model.config, sub), getattr(expected, sub)) for sub in expected.sub_configs]
    for ours, theirs in [(model.config, expected), *subs]:
        assert (ours.dtype, ours.name_or_path) == (theirs.dtype, theirs.name_or_path)
        assert ours.dtype == torch.float16


@pytest.mark.parametrize("kwargs", [dict(feature_layers=-2), dict(num_layers=1)])
def test_save_pretrained_of_a_truncated_tower(clip_dir, tmp_path, kwargs):
    """A tower built without its last layers would save a checkpoint whose config names layers it lacks (and no
    post-LayerNorm): transformers would initialise them at random and vitriton could not load it whole."""
    tower = vitriton.CLIPVisionModel.from_pretrained(clip_dir, **kwargs)
    with pytest.raises(RuntimeError, match="first 1 of 2 layers"):
        tower.save_pretrained(tmp_path)
    assert not any(tmp_path.iterdir())


def test_config_with_fewer_layers_than_weights(clip_dir, tmp_path):
    config = json.loads((clip_dir / "config.json").read_text())
    config["vision_config"]["num_hidden_layers"] = 1
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "model.safetensors").symlink_to(clip_dir / "model.safetensors")
    with pytest.warns(UserWarning, match="holds 2 layers under vision_model.encoder.layers but the config's"):
        vitriton.from_pretrained(tmp_path)


def test_wrong_prefix_lists_what_the_checkpoint_holds(clip_dir):
    with pytest.raises(CheckpointError, match="prefix 'vision_tower' holds no vision tower.*holds .*vision_model"):
        vitriton.CLIPVisionModel.from_pretrained(clip_dir, prefix="vision_tower")


# A device-side assert leaves the CUDA context unusable, so the bad call runs in a process of its own.
_BAD_CUDA_IDS = """
import sys, torch, vitriton
from tests.encoders import models
model = vitriton.from_transformers(models.clip_model(), device="cuda")
ids = torch.full((2, 5), {bad}, dtype=torch.long, device="cuda")
try:
    model.text_model(ids)
    torch.cuda.synchronize()
except Exception as error:
    print("raised:", error)
    sys.exit(3)
print("no error")
"""


@pytest.mark.gpu
@pytest.mark.parametrize("bad", [models.CLIP_TEXT["vocab_size"], -1])
def test_bad_cuda_token_id_fails_with_a_message(bad):
    """CUDA ids are checked on the device (no host sync in the forward); the failure still names the problem."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    result = subprocess.run(
        [sys.executable, "-c", _BAD_CUDA_IDS.format(bad=bad)], cwd=root, capture_output=True, text=True, timeout=300
    )
    output = result.stdout + result.stderr
    assert result.returncode == 3, output
    assert "token id is outside the vocabulary of 99 tokens" in output, output


def test_transformers_loading_keywords(clip_dir, tmp_path):
    """transformers' from_pretrained keywords work unchanged: the checkpoint's place (subfolder), config=,
    device_map naming one device, and the options that change nothing here."""
    same = dict(attn_implementation="sdpa", local_files_only=True, low_cpu_mem_usage=True, use_safetensors=True)
    same.update(ignore_mismatched_sizes=False)
    model = vitriton.CLIPVisionModel.from_pretrained(clip_dir, device_map="cpu", trust_remote_code=False, **same)
    assert type(model) is vitriton.CLIPVisionModel and model.device == torch.device("cpu")
    for device_map in ({"": "cpu"}, "balanced"):  # one device for every module; a strategy: the default device
        assert vitriton.from_pretrained(clip_dir, device_map=device_map, device="cpu").device == torch.device("cpu")
    config = transformers.AutoConfig.from_pretrained(clip_dir)
    config.vision_config.layer_norm_eps = 0.25  # config= is read instead of config.json
    model = vitriton.from_pretrained(clip_dir, config=config, attn_implementation="eager")
    assert type(model) is vitriton.CLIPModel and model.config.vision_config.layer_norm_eps == 0.25
    (tmp_path / "config.json").write_text(config.to_json_string())  # or a path to read it from, as transformers
    for given in (tmp_path, tmp_path / "config.json"):
        model = vitriton.CLIPVisionModel.from_pretrained(clip_dir, config=given)
        assert model.config.layer_norm_eps == 0.25
        assert vitriton.from_pretrained(clip_dir, config=str(given)).config.vision_config.layer_norm_eps == 0.25
    (tmp_path / "sub").symlink_to(clip_dir, target_is_directory=True)
    assert type(vitriton.from_pretrained(tmp_path, subfolder="sub", tower="text")) is vitriton.CLIPTextModel


@torch.no_grad()
@pytest.mark.parametrize("max_shard_size", ["50GB", "200KB"])
def test_variant_reads_transformers_variant_files(clip_dir, tmp_path, max_shard_size):
    """variant= reads model.<variant>.safetensors (or its sharded index) beside the default weights, as in
    transformers; a variant the directory lacks raises."""
    hf = transformers.CLIPVisionModel.from_pretrained(clip_dir).eval()
    hf.save_pretrained(tmp_path)
    models.perturb_vectors(hf).save_pretrained(tmp_path, variant="v2", max_shard_size=max_shard_size)
    px = models.pixels(2, 40)
    expected = transformers.CLIPVisionModel.from_pretrained(tmp_path, variant="v2")(px).pooler_output
    torch.testing.assert_close(hf(px).pooler_output, expected)
    ours = vitriton.CLIPVisionModel.from_pretrained(tmp_path, variant="v2")
    torch.testing.assert_close(ours(px).pooler_output, expected, rtol=1e-4, atol=1e-4)
    with pytest.raises(CheckpointError, match=r"no safetensors weights \(model.v3.safetensors or"):
        vitriton.from_pretrained(tmp_path, variant="v3")


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        (dict(use_safetensors=False), ValueError, "reads safetensors checkpoints only"),
        (dict(ignore_mismatched_sizes=True), ValueError, "ignore_mismatched_sizes=True: vitriton does not initialise"),
        (dict(device_map={"vision_model": "cpu", "text_model": "meta"}), ValueError, "on 2 devices"),
        (dict(device_map="cpu", device="meta"), ValueError, "name different devices"),
        (dict(config=1), TypeError, "takes a transformers PretrainedConfig or its path"),
        (dict(config="nowhere"), CheckpointError, "cannot read config='nowhere'"),
        (dict(subfolder="nowhere"), FileNotFoundError, "subfolder='nowhere'"),
        (dict(output_loading_info=True), TypeError, "'output_loading_info'"),
    ],
)
def test_transformers_loading_keywords_vitriton_cannot_honour(clip_dir, options, error, match):
    with pytest.raises(error, match=match):
        vitriton.from_pretrained(clip_dir, **options)


def test_unknown_keyword_names_the_class(clip_dir):
    """As in transformers, a keyword that names no config attribute raises, and so does one that does when a
    config object is given (transformers passes them to the model's __init__, which takes none)."""
    with pytest.raises(TypeError, match=r"CLIPModel.from_pretrained\(\) got unexpected keyword argument\(s\) 'bogus'"):
        vitriton.CLIPModel.from_pretrained(clip_dir, bogus=1)
    config = transformers.AutoConfig.from_pretrained(clip_dir)
    with pytest.raises(TypeError, match="'output_hidden_states'; with config= given, set them on that config"):
        vitriton.from_pretrained(clip_dir, config=config, output_hidden_states=True)
    with pytest.raises(CheckpointError, match=r"has shape \(48, 144\); the config expects \(32, 144\)"):
        vitriton.from_pretrained(clip_dir, projection_dim=32)  # transformers raises too (ignore_mismatched_sizes)
