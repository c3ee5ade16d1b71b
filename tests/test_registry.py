"""Specification of the model architectures, the registry format and ensemble scoring."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

import pytest
import safetensors.torch
import torch

from scanner.config import InputSpec
from scanner.models import ARCHITECTURES, ResNetV2, build_model, lens_probability
from scanner.registry import (
    Ensemble,
    autocast_dtype,
    RegistryError,
    default_models_dir,
    load_ensemble,
    load_version,
    resolve_version_dirs,
    save_version,
    write_untrained_ensemble,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
TINY_SPEC = InputSpec(bands=("g", "r", "i"), stamp_size_pix=16)
TINY_PARAMS = {"depth": 11, "width": 4}


def tiny_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = build_model("resnetv2", TINY_PARAMS, TINY_SPEC.n_channels)
    # Non-trivial BatchNorm statistics, so a round trip that lost buffers would show.
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
    return model.eval()


def save_tiny(registry: Path, name: str = "tiny", version: int = 1, spec: InputSpec = TINY_SPEC, **kwargs) -> Path:
    return save_version(
        tiny_model(version), registry, name=name, version=version, architecture="resnetv2",
        params=TINY_PARAMS, input_spec=spec, **kwargs,
    )


def stamps(n: int = 4, spec: InputSpec = TINY_SPEC, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, spec.n_channels, spec.stamp_size_pix, spec.stamp_size_pix, generator=generator)


def rewrite_meta(version_dir: Path, **changes) -> None:
    meta_path = version_dir / "model.json"
    meta = json.loads(meta_path.read_text())
    for key, value in changes.items():
        if value is None:
            del meta[key]
        else:
            meta[key] = value
    meta_path.write_text(json.dumps(meta))


# --- architectures -------------------------------------------------------------------------------


@pytest.mark.parametrize("depth", [10, 12, 2, 19])
def test_resnetv2_refuses_depth_not_of_form_9n_plus_2(depth):
    with pytest.raises(ValueError, match=r"9n\+2"):
        ResNetV2(3, depth=depth)


@pytest.mark.parametrize("depth, blocks_per_stage", [(11, 1), (20, 2)])
def test_resnetv2_has_n_bottleneck_blocks_per_stage_and_two_logits(depth, blocks_per_stage):
    model = ResNetV2(5, depth=depth, width=4).eval()
    assert [len(stage) for stage in model.stages] == [blocks_per_stage] * 3
    shortcuts = {id(block.shortcut) for stage in model.stages for block in stage if block.shortcut is not None}
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d) and id(m) not in shortcuts]
    assert len(convs) + 1 == depth  # weighted layers: stem, 3 convs per block, head; shortcuts not counted
    with torch.no_grad():
        x = torch.randn(3, 5, 24, 24)
        assert model(x).shape == (3, 2)
        assert model.forward_features(x).shape == (3, 16 * 4)
    assert model.num_features == 64


@pytest.mark.parametrize("architecture", sorted(ARCHITECTURES))
def test_every_named_architecture_builds_and_scores_a_stamp_batch(architecture):
    torch.manual_seed(0)
    model = build_model(architecture, {}, in_channels=3).eval()
    with torch.no_grad():
        x = torch.randn(2, 3, 64, 64)
        logits = model(x)
        features = model.forward_features(x)
    assert logits.shape == (2, 2)
    assert features.shape == (2, model.num_features)
    assert torch.isfinite(logits).all()


def test_build_model_refuses_unknown_architecture_listing_known_names():
    with pytest.raises(ValueError, match="unknown architecture 'vgg16'; known architectures: .*resnetv2"):
        build_model("vgg16", {}, 3)


def test_build_model_refuses_parameters_the_architecture_does_not_take():
    with pytest.raises(ValueError, match="does not accept params"):
        build_model("resnetv2", {"depth": 11, "dropout": 0.5}, 3)


def test_lens_probability_is_softmax_of_the_lens_logit():
    logits = torch.tensor([[0.0, 0.0], [0.0, 10.0], [3.0, -3.0]])
    expected = torch.softmax(logits, dim=1)[:, 1]
    assert torch.equal(lens_probability(logits), expected)


# --- save / load ---------------------------------------------------------------------------------


def test_saved_version_has_the_registry_layout_and_records(tmp_path):
    version_dir = save_tiny(tmp_path, name="tiny", version=3, training={"method": "pimodel"}, metrics={"auroc": 0.9})
    assert version_dir == tmp_path / "tiny" / "version-3"
    assert sorted(p.name for p in version_dir.iterdir()) == ["model.json", "model.safetensors"]
    assert not [p for p in (tmp_path / "tiny").iterdir() if p.name.startswith(".")]
    meta = json.loads((version_dir / "model.json").read_text())
    assert meta["format_version"] == 1
    assert meta["version"] == 3
    assert meta["architecture"] == {"name": "resnetv2", "params": TINY_PARAMS}
    assert InputSpec.from_dict(meta["input_spec"]) == TINY_SPEC
    assert meta["training"] == {"method": "pimodel"} and meta["metrics"] == {"auroc": 0.9}
    assert re.fullmatch(r"sha256:[0-9a-f]{64}", meta["content_hash"])
    assert {"created", "lensscan_version"} <= set(meta)


def test_float32_round_trip_gives_identical_scores(tmp_path):
    model = tiny_model(1)
    loaded = load_version(save_tiny(tmp_path, version=1))
    assert not loaded.model.training
    x = stamps()
    with torch.no_grad():
        assert torch.equal(loaded.model(x), model(x))


def test_float16_storage_loads_as_float32_within_tolerance(tmp_path):
    model = tiny_model(1)
    fp32_size = (save_tiny(tmp_path / "a", version=1) / "model.safetensors").stat().st_size
    version_dir = save_tiny(tmp_path / "b", version=1, dtype=torch.float16)
    assert (version_dir / "model.safetensors").stat().st_size < 0.6 * fp32_size
    loaded = load_version(version_dir)
    assert all(p.dtype == torch.float32 for p in loaded.model.parameters())
    x = stamps()
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(x), model(x), rtol=1e-2, atol=1e-2)


def test_existing_version_is_not_overwritten_unless_asked(tmp_path):
    save_tiny(tmp_path, version=1)
    with pytest.raises(RegistryError, match="already exists"):
        save_tiny(tmp_path, version=1)
    save_tiny(tmp_path, version=1, overwrite=True)
    assert load_version(tmp_path / "tiny" / "version-1").version == 1


def test_save_refuses_weights_of_another_architecture(tmp_path):
    with pytest.raises(RegistryError, match="weights do not match the architecture"):
        save_version(tiny_model(), tmp_path, name="tiny", version=1, architecture="resnetv2",
                     params={"depth": 20, "width": 4}, input_spec=TINY_SPEC)
    assert not (tmp_path / "tiny" / "version-1").exists()


def test_column_name_is_sanitised_name_and_version(tmp_path):
    loaded = load_version(save_tiny(tmp_path, name="lens-finder.v2 (g,r,i)", version=7))
    assert loaded.column == "score_lens_finder_v2__g_r_i__v7"


@pytest.mark.parametrize(
    "pickle_name", ["weights.pt", "model.pth", "extra.pkl", "a.pickle", "pytorch_model.bin", "last.ckpt"]
)
def test_version_with_a_pickle_file_is_refused(tmp_path, pickle_name):
    version_dir = save_tiny(tmp_path)
    (version_dir / pickle_name).write_bytes(b"\x80\x04K\x01.")
    with pytest.raises(RegistryError, match=rf"{re.escape(pickle_name)}.*only loaded from model.safetensors"):
        load_version(version_dir)


def test_corrupted_safetensors_is_refused_naming_the_file(tmp_path):
    version_dir = save_tiny(tmp_path)
    weights = version_dir / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(RegistryError, match=r"model\.safetensors is not a readable safetensors file"):
        load_version(version_dir)


def test_weights_changed_after_export_are_refused_by_content_hash(tmp_path):
    version_dir = save_tiny(tmp_path)
    weights = version_dir / "model.safetensors"
    state = safetensors.torch.load(weights.read_bytes())
    state["head.bias"] = state["head.bias"] + 1.0
    weights.write_bytes(safetensors.torch.save(state))
    with pytest.raises(RegistryError, match="weights changed after export"):
        load_version(version_dir)


def test_missing_model_json_is_refused(tmp_path):
    version_dir = save_tiny(tmp_path)
    (version_dir / "model.json").unlink()
    with pytest.raises(RegistryError, match=r"model\.json is missing"):
        load_version(version_dir)


def test_model_json_missing_fields_is_refused_naming_them(tmp_path):
    version_dir = save_tiny(tmp_path)
    rewrite_meta(version_dir, content_hash=None, input_spec=None)
    with pytest.raises(RegistryError, match=r"model\.json lacks required fields \['input_spec', 'content_hash'\]"):
        load_version(version_dir)


def test_unknown_architecture_in_model_json_is_refused(tmp_path):
    version_dir = save_tiny(tmp_path)
    rewrite_meta(version_dir, architecture={"name": "alexnet", "params": {}})
    with pytest.raises(RegistryError, match=r"model\.json: unknown architecture 'alexnet'"):
        load_version(version_dir)


def test_weights_not_matching_the_architecture_are_refused_naming_keys(tmp_path):
    version_dir = save_tiny(tmp_path)
    weights = version_dir / "model.safetensors"
    state = safetensors.torch.load(weights.read_bytes())
    state["head.extra"] = state.pop("head.bias")
    data = safetensors.torch.save(state)
    weights.write_bytes(data)
    rewrite_meta(version_dir, content_hash="sha256:" + hashlib.sha256(data).hexdigest())
    with pytest.raises(RegistryError, match=r"missing keys \['head.bias'\]; unexpected keys \['head.extra'\]"):
        load_version(version_dir)


# safetensors.torch.load is the safe loader, so only a bare torch.load (or pickle.load/loads) counts.
UNPICKLING_CALL = re.compile(r"(?<!safetensors\.)\btorch\.load\(|\bpickle\.loads?\(")


def test_scanner_and_training_source_never_unpickles():
    offenders = [
        f"{path.relative_to(REPO_ROOT)}:{number}: {line.strip()}"
        for folder in ("scanner", "training")
        if (REPO_ROOT / folder).is_dir()
        for path in sorted((REPO_ROOT / folder).rglob("*.py"))
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if UNPICKLING_CALL.search(line)
    ]
    assert offenders == []


def test_unpickling_pattern_catches_torch_load_but_not_safetensors():
    assert UNPICKLING_CALL.search("state = torch" + ".load(path)")
    assert UNPICKLING_CALL.search("obj = pickle" + ".loads(data)")
    assert not UNPICKLING_CALL.search("state = safetensors.torch.load(data)")


# --- resolving paths -----------------------------------------------------------------------------


@pytest.fixture
def registry(tmp_path) -> Path:
    for name, version in [("alpha", 1), ("alpha", 2), ("alpha", 10), ("beta", 1)]:
        save_tiny(tmp_path, name=name, version=version)
    return tmp_path


def test_resolve_accepts_a_version_directory(registry):
    assert resolve_version_dirs([registry / "alpha" / "version-2"]) == [registry / "alpha" / "version-2"]


def test_resolve_accepts_a_model_directory_in_numeric_version_order(registry):
    assert [p.name for p in resolve_version_dirs([registry / "alpha"])] == ["version-1", "version-2", "version-10"]


def test_resolve_accepts_a_registry_root_and_deduplicates(registry):
    dirs = resolve_version_dirs([registry, str(registry / "beta"), registry / "alpha" / "version-1"])
    assert [(p.parent.name, p.name) for p in dirs] == [
        ("alpha", "version-1"), ("alpha", "version-2"), ("alpha", "version-10"), ("beta", "version-1"),
    ]


def test_resolve_refuses_a_directory_without_versions(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(RegistryError, match="no model versions under .*empty"):
        resolve_version_dirs([tmp_path / "empty"])
    with pytest.raises(RegistryError, match="is not a directory"):
        resolve_version_dirs([tmp_path / "nowhere"])


# --- ensembles -----------------------------------------------------------------------------------


def test_ensemble_predict_equals_each_versions_softmax(registry):
    ensemble = load_ensemble([registry / "alpha"])
    x = stamps(5)
    scores = ensemble.predict(x)
    assert scores.shape == (5, 3) and scores.dtype == torch.float32
    with torch.no_grad():
        expected = torch.stack([torch.softmax(v.model(x), dim=1)[:, 1] for v in ensemble.versions], dim=1)
    torch.testing.assert_close(scores, expected, rtol=0, atol=1e-6)
    assert ensemble.columns == ["score_alpha_v1", "score_alpha_v2", "score_alpha_v10"]


def test_precision_float32_by_default_on_the_cpu_and_bfloat16_on_request():
    ensemble = load_ensemble([default_models_dir()])
    x = stamps(64, InputSpec(), seed=3)
    assert ensemble.precision == "float32"
    exact = ensemble.predict(x)
    assert ensemble.to("cpu", precision="auto").precision == "float32"
    assert ensemble.to("cpu", precision="bfloat16").precision == "bfloat16"
    reduced = ensemble.predict(x)
    # bfloat16 keeps 8 bits of mantissa: scores move, by about 0.01 at most for these networks.
    assert 0 < (reduced - exact).abs().max() < 0.05
    torch.testing.assert_close(ensemble.predict(x, autocast=False), exact, rtol=0, atol=1e-6)
    assert autocast_dtype("float32", torch.device("cpu")) is None
    with pytest.raises(ValueError, match="unknown precision 'half'; choose one of auto, float32, bfloat16"):
        ensemble.to("cpu", precision="half")


def test_ensemble_describes_each_version_for_provenance(registry):
    ensemble = load_ensemble([registry / "beta"])
    [entry] = ensemble.describe()
    meta = json.loads((registry / "beta" / "version-1" / "model.json").read_text())
    assert entry == {"name": "beta", "version": 1, "content_hash": meta["content_hash"],
                     "path": str(registry / "beta" / "version-1")}


def test_ensemble_refuses_stamps_of_the_wrong_shape(registry):
    ensemble = load_ensemble([registry / "beta"])
    with pytest.raises(ValueError, match=r"expects \(N, 3, 16, 16\)"):
        ensemble.predict(torch.zeros(2, 3, 32, 32))


def test_ensemble_refuses_versions_with_different_input_specs_naming_both(tmp_path):
    save_tiny(tmp_path, name="gri", version=1)
    finer = InputSpec(bands=("g", "r", "i"), stamp_size_pix=16, pixel_scale_arcsec=0.2)
    save_tiny(tmp_path, name="gri-finer", version=1, spec=finer)
    with pytest.raises(RegistryError, match=r"gri v1 .* and gri-finer v1 .*pixel_scale_arcsec: 0\.26 vs 0\.2"):
        load_ensemble([tmp_path])


def test_ensemble_refuses_the_same_version_twice_under_different_paths(tmp_path):
    version_dir = save_tiny(tmp_path / "a")
    shutil.copytree(version_dir, tmp_path / "copy" / "version-1")
    with pytest.raises(RegistryError, match="same score columns"):
        Ensemble([load_version(version_dir), load_version(tmp_path / "copy" / "version-1")])


def test_untrained_ensemble_is_reproducible_from_its_seed(tmp_path):
    kwargs = dict(name="u", n_versions=2, input_spec=TINY_SPEC, params=TINY_PARAMS, seed=5)
    first = write_untrained_ensemble(tmp_path / "a", **kwargs)
    second = write_untrained_ensemble(tmp_path / "b", **kwargs)
    hashes = [[json.loads((d / "model.json").read_text())["content_hash"] for d in dirs] for dirs in (first, second)]
    assert hashes[0] == hashes[1] and hashes[0][0] != hashes[0][1]


def test_shipped_default_ensemble_loads_and_scores(tmp_path):
    ensemble = load_ensemble([default_models_dir()])
    assert len(ensemble) == 4
    assert ensemble.input_spec == InputSpec()
    for version in ensemble.versions:  # trained by the project's own pipeline, and says how
        training = version.meta["training"]
        assert training["method"] == "supervised" and training["epochs"] == 30
        assert training["augment"]["rot90"] and training["config"]["versions"] == 4
        assert version.meta["metrics"]["auroc"] > 0.9
        assert (version.path / "model.safetensors").stat().st_size < 1_000_000  # float16
    scores = ensemble.predict(stamps(2, InputSpec()))
    assert scores.shape == (2, 4)
    assert ((scores > 0) & (scores < 1)).all()


def test_resnetv2_trains_through_its_in_place_activations():
    model = ResNetV2(3, depth=11, width=2).train()
    x = torch.randn(4, 3, 16, 16, requires_grad=True)
    torch.nn.functional.cross_entropy(model(x), torch.tensor([0, 1, 0, 1])).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    assert torch.isfinite(x.grad).all()
