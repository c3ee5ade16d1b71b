"""The lens GAN: its training step, sampling, export and loading, Ray Train job and quality check."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
from torch import nn

from scanner.config import InputSpec
from training.gan import (META_FILE, WEIGHTS_FILE, Critic, GanConfig, GanError, GeneratedLenses,
                          Generator, critic_step, generator_step, gradient_penalty, load_generator,
                          read_checkpoint, read_gan_meta, save_generator, train_gan,
                          write_checkpoint)
from training.gan_cli import add_gan_command
from training.gan_quality import QualityConfig, frechet_distance, gan_quality

SPEC = InputSpec(stamp_size_pix=16)
DISPLAY = {"bands": ["g", "r", "i"], "magzero": [30.0, 30.0, 30.0], "sky_sigma": [1.0, 1.0, 1.0]}
# Few stamps: the tiny survey's deflector pool is small.
TINY_GAN = GanConfig(width=4, batch_size=2, n_critic=1, steps=2, report_every=1,
                     checkpoint_every=1, scale_sample_stamps=4, seed=5)


def _networks(size: int = 16, width: int = 4) -> tuple[Generator, Critic]:
    torch.manual_seed(0)
    return Generator(3, size, output_scale=4.0, width=width), Critic(3, size, width=width)


def _adam(module: nn.Module) -> torch.optim.Adam:
    return torch.optim.Adam(module.parameters(), lr=1e-4, betas=(0.0, 0.9))


def _export(tmp_path, name: str = "gan") -> str:
    generator, _ = _networks()
    out = tmp_path / name
    save_generator(generator.eval(), out, input_spec=SPEC, display=DISPLAY,
                   training={"config": GanConfig().to_dict(), "steps": 0},
                   data={"url": "none"})
    return str(out)


def _linear_critic(weight_norm: float) -> nn.Module:
    critic = nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 1))
    with torch.no_grad():
        w = torch.randn(1, 3 * 16 * 16)
        critic[1].weight.copy_(weight_norm * w / w.norm())
    return critic


# ---------------------------------------------------------------------------------------------
# The training step


def test_critic_loss_and_gradient_penalty_are_finite_on_a_tiny_batch():
    generator, critic = _networks()
    logged = critic_step(generator, critic, _adam(critic), torch.randn(4, 3, 16, 16), 10.0,
                         torch.Generator().manual_seed(0))
    assert set(logged) == {"critic_loss", "wasserstein_estimate", "gradient_penalty"}
    assert all(math.isfinite(v) for v in logged.values())
    assert logged["gradient_penalty"] >= 0


def test_gradient_penalty_vanishes_for_a_critic_with_unit_gradient_norm():
    real, fake = torch.randn(8, 3, 16, 16), torch.randn(8, 3, 16, 16)
    assert gradient_penalty(_linear_critic(1.0), real, fake).item() == pytest.approx(0.0, abs=1e-6)


def test_gradient_penalty_is_the_squared_excess_of_the_gradient_norm():
    real, fake = torch.randn(8, 3, 16, 16), torch.randn(8, 3, 16, 16)
    assert gradient_penalty(_linear_critic(3.0), real, fake).item() == pytest.approx(4.0, rel=1e-4)
    assert gradient_penalty(_linear_critic(0.5), real, fake).item() == pytest.approx(0.25, rel=1e-4)


@pytest.mark.parametrize("size", [8, 16, 20, 64])
def test_generator_output_has_the_stamp_shape_and_stays_within_its_output_scale(size):
    generator = Generator(3, size, output_scale=2.5, width=4)
    with torch.no_grad():
        x = generator(torch.randn(5, 128) * 10)
    assert x.shape == (5, 3, size, size)
    assert float(x.abs().max()) <= 2.5
    assert Critic(3, size, width=4)(x).shape == (5,)


def test_a_critic_step_updates_the_critic_and_not_the_generator():
    generator, critic = _networks()
    before_g = [p.clone() for p in generator.parameters()]
    before_c = [p.clone() for p in critic.parameters()]
    critic_step(generator, critic, _adam(critic), torch.randn(4, 3, 16, 16))
    assert any(not torch.equal(a, b) for a, b in zip(before_c, critic.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(before_g, generator.parameters()))


def test_a_generator_step_updates_the_generator_and_leaves_the_critic_trainable():
    generator, critic = _networks()
    before_g = [p.clone() for p in generator.parameters()]
    before_c = [p.clone() for p in critic.parameters()]
    logged = generator_step(generator, critic, _adam(generator), 4)
    assert math.isfinite(logged["generator_loss"])
    assert any(not torch.equal(a, b) for a, b in zip(before_g, generator.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(before_c, critic.parameters()))
    assert all(p.requires_grad for p in critic.parameters())


def test_a_checkpoint_restores_networks_and_optimisers_exactly(tmp_path):
    generator, critic = _networks()
    optimisers = {"generator": _adam(generator), "critic": _adam(critic)}
    critic_step(generator, critic, optimisers["critic"], torch.randn(4, 3, 16, 16))
    generator_step(generator, critic, optimisers["generator"], 4)
    write_checkpoint(tmp_path, generator, critic, optimisers, {"step": 1, "epoch": 0})
    g2, c2 = _networks()
    restored = {"generator": _adam(g2), "critic": _adam(c2)}
    state = read_checkpoint(tmp_path, g2, c2, restored)
    assert state["step"] == 1
    for a, b in zip(generator.state_dict().values(), g2.state_dict().values()):
        assert torch.equal(a, b)
    for name in optimisers:
        original, loaded = optimisers[name].state_dict(), restored[name].state_dict()
        assert loaded["param_groups"][0]["betas"] == (0.0, 0.9)
        for k, per_param in original["state"].items():
            for key, value in per_param.items():
                assert torch.equal(value, loaded["state"][k][key])
    assert not list(tmp_path.glob("*.pt"))


def test_gan_config_refuses_nonsense_naming_the_field():
    with pytest.raises(ValueError, match="batch_size=0"):
        GanConfig(batch_size=0)
    assert GanConfig.from_dict(GanConfig().to_dict()) == GanConfig()


# ---------------------------------------------------------------------------------------------
# Export, loading, sampling


def test_sampling_is_deterministic_by_seed(tmp_path):
    lenses = GeneratedLenses(_export(tmp_path))
    a = lenses.sample(6, torch.Generator().manual_seed(1))
    b = lenses.sample(6, torch.Generator().manual_seed(1))
    c = lenses.sample(6, torch.Generator().manual_seed(2))
    assert a.shape == (6, 3, 16, 16) and not a.requires_grad
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def test_sampling_in_chunks_gives_the_same_stamps(tmp_path):
    path = _export(tmp_path)
    whole = GeneratedLenses(path).sample(7, torch.Generator().manual_seed(3))
    chunked = GeneratedLenses(path, max_batch=3).sample(7, torch.Generator().manual_seed(3))
    torch.testing.assert_close(whole, chunked)


def test_export_and_load_round_trip_gives_identical_samples(tmp_path):
    generator, _ = _networks()
    generator.eval()
    out = tmp_path / "gan"
    meta = save_generator(generator, out, input_spec=SPEC, display=DISPLAY, training={},
                          data={"url": "none"})
    loaded = load_generator(out)
    z = torch.randn(5, 128)
    with torch.no_grad():
        assert torch.equal(generator(z), loaded(z))
    assert meta["output_scale"] == 4.0 and read_gan_meta(out)["input_spec"] == SPEC.to_dict()
    assert GeneratedLenses(out).spec == SPEC


@pytest.mark.parametrize("name", ["generator.pt", "extra.pkl", "nested/last.ckpt"])
def test_a_pickle_file_in_the_gan_dir_is_refused(tmp_path, name):
    path = tmp_path / "gan"
    _export(tmp_path)
    (path / name).parent.mkdir(parents=True, exist_ok=True)
    (path / name).write_bytes(b"\x80\x04K\x01.")
    with pytest.raises(GanError, match="pickle"):
        load_generator(path)


def test_weights_changed_after_export_are_refused_by_content_hash(tmp_path):
    path = tmp_path / "gan"
    _export(tmp_path)
    state = safetensors.torch.load((path / WEIGHTS_FILE).read_bytes())
    state["out_conv.bias"] = state["out_conv.bias"] + 1
    (path / WEIGHTS_FILE).write_bytes(safetensors.torch.save(state))
    with pytest.raises(GanError, match="changed after export"):
        load_generator(path)


def test_samples_refuse_a_stream_of_another_input_spec(tmp_path):
    lenses = GeneratedLenses(_export(tmp_path))
    lenses.check_input_spec(SPEC)
    with pytest.raises(GanError, match="same input spec"):
        lenses.check_input_spec(InputSpec(stamp_size_pix=64))


def test_frechet_distance_is_zero_for_one_set_and_grows_with_a_shift():
    x = np.random.default_rng(0).normal(size=(500, 4))
    assert frechet_distance(x, x) == pytest.approx(0.0, abs=1e-6)
    assert frechet_distance(x, x + 2.0) == pytest.approx(16.0, rel=1e-6)


def _cli(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    add_gan_command(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.func(args)


def test_gan_sample_writes_the_same_stamps_for_the_same_seed(tmp_path):
    path = _export(tmp_path)
    for name in ("a", "b"):
        assert _cli("gan", "sample", "--gan", path, "--n", "3", "--seed", "4",
                    "--out", str(tmp_path / f"{name}.npy")) == 0
    a, b = np.load(tmp_path / "a.npy"), np.load(tmp_path / "b.npy")
    assert a.shape == (3, 3, 16, 16) and np.array_equal(a, b)
    assert _cli("gan", "sample", "--gan", path, "--n", "3", "--out", str(tmp_path / "s.png")) == 0
    assert (tmp_path / "s.png").read_bytes()[:4] == b"\x89PNG"


def test_gan_train_refuses_an_out_holding_an_exported_gan(tmp_path, capsys):
    path = _export(tmp_path)
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "dataset.json").write_text(json.dumps(
        {"counts": {"train": {"deflector": 1}}, "input_spec": SPEC.to_dict()}))
    assert _cli("gan", "train", "--data", str(tmp_path / "ds"), "--out", path) == 2
    assert "already holds an exported GAN" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# Ray Train and the quality report, on the tiny survey


@pytest.fixture(scope="module")
def dataset(train_dataset):
    return train_dataset


@pytest.fixture(scope="module")
def trained(ray_cluster, dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("gan-train") / "gan"
    return train_gan(TINY_GAN, dataset, out), out


def test_train_gan_under_ray_train_writes_a_loadable_export(trained, dataset):
    run, out = trained
    meta = json.loads((out / META_FILE).read_text())
    assert run.steps == meta["training"]["steps"] == TINY_GAN.steps
    assert meta["input_spec"] == json.loads((Path(dataset) / "dataset.json").read_text())["input_spec"]
    assert meta["output_scale"] > 0 and meta["architecture"]["params"]["width"] == 4
    assert meta["data"]["url"] == dataset and meta["data"]["n_deflectors"] > 0
    assert all(math.isfinite(meta["training"]["final_metrics"][k])
               for k in ("critic_loss", "gradient_penalty", "generator_loss"))
    assert list((out / "checkpoints").glob("checkpoint_*/critic.safetensors"))
    x = GeneratedLenses(out).sample(4, torch.Generator().manual_seed(0))
    assert x.shape == (4, 3, 64, 64) and float(x.abs().max()) <= meta["output_scale"]


def test_quality_report_of_the_trained_gan_has_finite_numbers(trained, dataset, tmp_path):
    _, out = trained
    report = gan_quality(out, dataset, tmp_path / "quality", QualityConfig(n_stamps=8, n_grid=4))
    assert all(math.isfinite(v) and v >= 0 for v in report["frechet_feature_distance"].values())
    for band in ("g", "r", "i"):
        assert math.isfinite(report["photometry"][f"mag_{band}"]["ks_gan_vs_injected"])
    assert math.isfinite(report["photometry"]["g-r"]["injected"]["median"])
    for name in ("quality.json", "quality.png", "samples.png"):
        assert (tmp_path / "quality" / name).stat().st_size > 0
    recorded = read_gan_meta(out)["quality"]["frechet_feature_distance"]
    assert recorded == report["frechet_feature_distance"]
    load_generator(out)  # rewriting gan.json keeps the export loadable
