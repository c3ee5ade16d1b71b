"""The ablation runner on a 2-cell toy grid, and GAN positives in the training stream."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from scanner.config import InputSpec
from training.ablate import FIGURES, AblationConfig, run_ablation
from training.dataset import DatasetConfig, build_dataset, open_dataset, read_pool
from training.evaluate import EvaluationConfig, lens_metrics
from training.gan import GeneratedLenses, Generator, save_generator
from training.inject import InjectionConfig
from training.lookalikes import LookalikeConfig
from training.stream import KIND_GENERATED, KIND_LENS, LensTrainingStream, StreamConfig

CHEAP = {"supersample": 1, "max_draws": 3}


def _gan(directory: Path, spec: InputSpec) -> str:
    """An exported (untrained) generator of ``spec`` stamps: the plumbing, not the quality."""
    torch.manual_seed(0)
    generator = Generator(spec.n_channels, spec.stamp_size_pix, output_scale=3.0, width=4)
    save_generator(generator, directory, input_spec=spec, display={}, training={"steps": 0},
                   data={"url": "test"})
    return str(directory)


@pytest.fixture(scope="module")
def spec(train_dataset) -> InputSpec:
    return InputSpec.from_dict(open_dataset(train_dataset)["input_spec"])


def test_gan_positives_replace_the_chosen_share_of_injected_ones(train_dataset, spec, tmp_path):
    gan = GeneratedLenses(_gan(tmp_path / "gan", spec))
    config = StreamConfig(batch_size=16, gan_fraction=0.25, lookalike_rate=0.0,
                          injection=InjectionConfig(**CHEAP), lookalikes=LookalikeConfig(**CHEAP))
    pools = (read_pool(train_dataset, "deflector"), read_pool(train_dataset, "non_lens"))
    stream = LensTrainingStream(*pools, spec, config, generated=gan.sample)
    assert (stream.n_injected, stream.n_generated) == (6, 2)
    batch = next(stream.epoch(0))
    kind = batch["kind"].numpy()
    assert (kind == KIND_GENERATED).sum() == 2 and (kind == KIND_LENS).sum() <= 6
    assert (batch["label"].numpy() == np.isin(kind, [KIND_LENS, KIND_GENERATED])).all()
    assert (batch["objid"].numpy()[kind == KIND_GENERATED] == -1).all()
    again = next(LensTrainingStream(*pools, spec, config, generated=gan.sample).epoch(0))
    torch.testing.assert_close(batch["x"], again["x"])  # the GAN draws from the stream's seed
    with pytest.raises(ValueError, match="gan_fraction"):
        StreamConfig(gan_fraction=1.0)


def test_ablation_runs_a_two_cell_grid_on_ray_and_tabulates_the_test_survey(
        train_dataset, spec, tiny_survey, ray_cluster, tmp_path):
    """VAT and pseudo-labelling with GAN positives, each on 2 Ray Train workers, 2 trials at once."""
    test = tmp_path / "test-set"  # every sky cell held out: the test survey's known lenses
    build_dataset(DatasetConfig(tiles=tiny_survey.tiles_url, catalog=tiny_survey.catalog_url,
                                out=str(test), tile_pattern=tiny_survey.tile_pattern,
                                truth=tiny_survey.truth_url, holdout_fraction=1.0, seed=1))
    shared = {"epochs": 2, "steps_per_epoch": 8, "workers": 2, "learning_rate": 5e-3,
              "model_params": {"depth": 11, "width": 4, "stem_stride": 2},
              "stream": {"batch_size": 8, "injection": CHEAP, "lookalikes": CHEAP},
              "evaluation": {"top_n": [5]}}
    config_file = tmp_path / "ablation.json"
    config_file.write_text(json.dumps({
        "data": train_dataset, "test": str(test), "out": str(tmp_path / "ablation"),
        "train": shared, "methods": ["vat", "pseudo_label"], "augment": [False], "gan": [True],
        "gan_dir": _gan(tmp_path / "gan", spec), "versions": 1, "max_concurrent": 2}))
    config = AblationConfig.from_file(config_file)
    assert [c.name for c in config.cells()] == ["vat-noaug-gan", "pseudo_label-noaug-gan"]

    summary = run_ablation(config)

    out = Path(config.out)
    results = pd.read_csv(out / "results.csv")
    assert list(results["cell"]) == ["vat-noaug-gan"] * 2 + ["pseudo_label-noaug-gan"] * 2
    assert set(results["version"].astype(str)) == {"1", "ensemble"}
    n_lenses = int(results["n_test_lenses"].iloc[0])
    assert n_lenses == len(read_pool(str(test), "known_lens", "holdout")) > 0
    for cell in config.cells():  # each figure is that of the cell's saved test-set predictions
        predictions = pd.read_parquet(out / "eval" / cell.name / "predictions.parquet")
        assert set(predictions["kind"]) <= {"known_lens", "deflector", "non_lens", "lookalike"}
        score = next(c for c in predictions.columns if c.startswith("score_"))
        expected = lens_metrics(predictions[score].to_numpy(), predictions["label"].to_numpy(),
                                EvaluationConfig(top_n=(5,)))
        row = results[(results["cell"] == cell.name) & (results["version"].astype(str) == "1")]
        for key in FIGURES:
            assert row[key].iloc[0] == pytest.approx(expected[key], nan_ok=True)
    for cell in config.cells():  # two methods trained end to end on 2 Ray Train workers
        training = json.loads((out / "registry" / cell.name / "version-1" /
                               "model.json").read_text())["training"]
        assert training["method"] == cell.method and training["workers"] == 2
        assert training["history"][-1]["loss_labelled"] < training["history"][0]["loss_labelled"]
        assert training["gan"]["fraction"] == 0.25 and training["gan"]["content_hash"]
    assert len(summary) == 2 and {"precision_at_recall_0.8_mean", "auroc_std"} <= set(summary)
    table = (out / "results.md").read_text()
    assert "| pseudo_label-noaug-gan | 1 |" in table and "P@R0.8" in table
    assert (out / "pr_curves.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("name", ["ablation-small", "ablation-paper"])
def test_the_shipped_ablation_configs_are_valid(name):
    root = Path(__file__).resolve().parents[1]
    config = AblationConfig.from_file(root / "configs" / f"{name}.toml")
    cells = config.cells()
    assert len({c.name for c in cells}) == len(cells)
    assert {(c.augment, c.gan) for c in cells} >= {(False, False), (True, True)}
    assert any(c.pools for c in cells)  # the scaling study
