"""Single-node vs three-node scan of the same mock survey, in one run on one ``ray.cluster_utils.Cluster``.

    python benchmarks/bench_multinode.py [--work DIR] [--json benchmarks/results/multinode.json]

The cluster starts with one worker node of 2 CPUs (the head holds none), scans, grows to three
worker nodes and scans again, so both figures come from the same machine and run. On one machine
the nodes share its cores: the figure shows the scan spreading and its overhead, not a speed-up
that separate machines would give.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import ray
from ray.cluster_utils import Cluster

from scanner.config import ScanConfig
from scanner.mock_survey import MockSurveyConfig, make_mock_survey, open_mock_survey
from scanner.pipeline import run_scan
from scanner.registry import default_models_dir


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "lensscan-multinode"))
    ap.add_argument("--json", default=str(Path(__file__).parent / "results" / "multinode.json"))
    args = ap.parse_args()
    root = str(Path(args.work) / "survey")
    survey = open_mock_survey(root) or make_mock_survey(
        root, MockSurveyConfig(n_tiles=6, size_pix=1024, n_lenses=6, seed=3))
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    cluster.add_node(num_cpus=2)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False, configure_logging=False)
    figures: dict = {}

    def scan(tag: str, actors: int) -> None:
        config = ScanConfig(tiles=survey.tiles_url, catalog=survey.catalog_url,
                            out=str(Path(args.work) / tag), model_dirs=(str(default_models_dir()),),
                            tile_pattern=survey.tile_pattern, batch_size=256, num_actors=actors,
                            overwrite=True, report_top_n=0)
        started = time.perf_counter()
        result = run_scan(config)
        figures[tag] = {"objects": result.n_scored + result.n_failed,
                        "wall_s": time.perf_counter() - started,
                        "stamps_per_s_wall": result.stamps_per_s,
                        "stamps_per_s_steady": result.steady_stamps_per_s,
                        "nodes": sorted(set(result.nodes["cut"]) | set(result.nodes["score"]))}

    try:
        scan("warmup", 1)  # imports, worker start-up: not timed
        scan("single-node", 1)
        for _ in range(2):
            cluster.add_node(num_cpus=2)
        cluster.wait_for_nodes()
        scan("three-nodes", 3)
    finally:
        ray.shutdown()
        cluster.shutdown()
    del figures["warmup"]
    for tag, f in figures.items():
        print(f"{tag:12s} {f['objects']} objects on {len(f['nodes'])} node(s): "
              f"{f['stamps_per_s_wall']:.0f} stamps/s wall, {f['stamps_per_s_steady']:.0f} steady")
    Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")
    print(f"saved {args.json}")


if __name__ == "__main__":
    main()
