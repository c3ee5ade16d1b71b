"""Report grades as training examples: reading grades.csv, cutting the graded stamps, the stream."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from scanner.config import InputSpec
from training.dataset import DatasetError, open_dataset, read_pool
from training.grades import build_graded_dataset, read_grades
from training.inject import InjectionConfig
from training.lookalikes import LookalikeConfig
from training.stream import KIND_KNOWN, LensTrainingStream, StreamConfig

CHEAP = {"supersample": 1, "max_draws": 3}


def write_grades(path, tiny_scan, tiny_survey) -> pd.DataFrame:
    """grades.csv as the report exports it: the survey's lenses A and B, a galaxy not_lens, one C."""
    candidates = pd.read_parquet(tiny_scan[1] / "candidates.parquet")
    truth = pd.read_parquet(tiny_survey.truth_url)
    lenses = truth.loc[truth["is_lens"], "objid"].to_numpy()
    others = candidates.loc[~candidates["objid"].isin(lenses), "objid"].to_numpy()[:2]
    picked = candidates.set_index("objid").loc[[*lenses[:2], *others]].reset_index()
    picked["grade"] = ["A", "B", "not_lens", "C"][:len(picked)]
    picked[["objid", "ra", "dec", "tile", "score", "grade"]].to_csv(path, index=False)
    return picked


def test_grades_become_known_lenses_and_hard_negatives_cut_from_the_scans_tiles(
        tiny_scan, tiny_survey, tmp_path):
    picked = write_grades(tmp_path / "grades.csv", tiny_scan, tiny_survey)
    graded = build_graded_dataset(str(tmp_path / "grades.csv"), str(tiny_scan[1]), str(tmp_path / "g"))
    counts = open_dataset(graded)["counts"]["train"]
    assert counts["known_lens"] == 2
    assert counts["non_lens"] + counts["deflector"] == 1  # C is left out
    known = read_pool(graded, "known_lens")
    assert set(known.rows["objid"].to_numpy()) == set(picked["objid"][:2])
    again = build_graded_dataset(str(tmp_path / "grades.csv"), str(tiny_scan[1]), str(tmp_path / "g"))
    assert again == graded  # the same grades are cut once


@pytest.mark.parametrize("text, message", [
    ("objid,ra,dec\n1,2,3\n", r"lacks column\(s\) \['grade'\]"),
    ("objid,ra,dec,grade\n1,2,3,A\n2,2,3,maybe\n", "row 3: grade 'maybe' is not one of"),
    ("objid,ra,dec,grade\n1,x,3,A\n", "row 2: objid, ra and dec must be numbers"),
    ("objid,ra,dec,grade\n1,2,3,A\n1,2,3,not_lens\n", "objid 1 is graded both"),
])
def test_bad_grades_files_are_refused_naming_the_row(tmp_path, text, message):
    path = tmp_path / "grades.csv"
    path.write_text(text)
    with pytest.raises(DatasetError, match=message):
        read_grades(str(path))


def test_known_lenses_take_their_share_of_every_batchs_positives(train_dataset):
    spec = InputSpec.from_dict(open_dataset(train_dataset)["input_spec"])
    known = read_pool(train_dataset, "known_lens")
    assert len(known) > 0
    config = StreamConfig(batch_size=16, known_lens_fraction=0.25, injection=InjectionConfig(**CHEAP),
                          lookalikes=LookalikeConfig(**CHEAP))
    stream = LensTrainingStream(read_pool(train_dataset, "deflector"),
                                read_pool(train_dataset, "non_lens"), spec, config, known_lenses=known)
    batch = next(stream.epoch(0))
    is_known = batch["kind"].numpy() == KIND_KNOWN
    assert is_known.sum() == stream.n_known == 2
    assert (batch["label"].numpy()[is_known] == 1).all()
    assert np.isin(batch["objid"].numpy()[is_known], known.rows["objid"].to_numpy()).all()
