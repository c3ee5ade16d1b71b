"""Multi-node scans on a real ``ray.cluster_utils.Cluster`` (one process can join one cluster, so
``tests/test_cluster.py`` runs this in a subprocess).

    python -m tests.cluster_scenarios SURVEY_JSON MODELS WORKDIR  ->  prints one JSON line

Scenarios, each a full scan of the same survey into its own output:
  spread      3 worker nodes, 3 scoring actors, one of which kills itself mid-batch (test-only
              switch) and is restarted by Ray: where did cutting and scoring run, was anything lost?
  node-loss   a worker node is removed while the scan runs
  train       Ray Train with 2 workers (a fresh node added first); a training worker dies as it
              starts epoch 2 (test-only switch), after epoch 1's checkpoint: Ray Train restarts
              the worker group and the run resumes from that checkpoint, then exports
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path

from ray.cluster_utils import Cluster

from scanner.config import ScanConfig
from scanner.pipeline import run_scan


def _config(survey: dict, models: str, out: Path, **kw) -> ScanConfig:
    return ScanConfig(tiles=survey["tiles_url"], catalog=survey["catalog_url"], out=str(out),
                      model_dirs=(models,), tile_pattern=survey["tile_pattern"], batch_size=16, **kw)


def _scan(survey: dict, models: str, out: Path, **kw) -> dict:
    t = time.perf_counter()
    r = run_scan(_config(survey, models, out, **kw))
    return {"out": str(out), "n_scored": r.n_scored, "n_failed": r.n_failed, "nodes": r.nodes,
            "seconds": time.perf_counter() - t, "stamps_per_s": r.stamps_per_s}


def main() -> None:
    survey = json.loads(Path(sys.argv[1]).read_text())
    models, work = sys.argv[2], Path(sys.argv[3])
    import ray

    # The test-only fault switches reach the workers as production settings would: from the
    # nodes' own environment (the scan forwards only storage settings). Each fires once per file.
    os.environ["LENSSCAN_TEST_KILL_SCORER"] = str(work / "scorer-died")
    os.environ["LENSSCAN_TEST_KILL_TRAIN_WORKER"] = str(work / "train-worker-died")
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    workers = [cluster.add_node(num_cpus=2) for _ in range(3)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False, configure_logging=False)
    try:
        print(json.dumps(run(cluster, workers, survey, models, work)))
    finally:
        ray.shutdown()
        cluster.shutdown()


def run(cluster: Cluster, workers: list, survey: dict, models: str, work: Path) -> dict:
    result: dict = {"worker_nodes": [n.node_id for n in workers]}

    result["spread"] = _scan(survey, models, work / "spread", num_actors=3)
    result["spread"]["actor_died"] = Path(os.environ["LENSSCAN_TEST_KILL_SCORER"]).exists()

    out = work / "node-loss"
    victim = workers[-1]
    removed = threading.Event()

    def remove_when_started() -> None:
        manifest = out / "_manifest"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not (manifest.exists() and any(manifest.iterdir())):
            time.sleep(0.05)
        cluster.remove_node(victim, allow_graceful=False)
        removed.set()

    killer = threading.Thread(target=remove_when_started, daemon=True)
    killer.start()
    result["node_loss"] = _scan(survey, models, out, num_actors=2)
    killer.join(timeout=5)
    result["node_loss"]["node_removed_during_scan"] = removed.is_set()
    result["node_loss"]["removed_node"] = victim.node_id
    if survey.get("train_dataset"):
        result["train"] = train_losing_a_worker(cluster, survey["train_dataset"], work / "train")
    return result


def train_losing_a_worker(cluster: Cluster, data: str, out: Path) -> dict:
    """Train 3 epochs on 2 workers; the rank-1 worker dies as it starts epoch 2."""
    from training.augment import AugmentConfig
    from training.config import TrainConfig
    from training.evaluate import EvaluationConfig
    from training.loop import train
    from training.stream import StreamConfig

    cluster.add_node(num_cpus=2)
    cluster.wait_for_nodes()
    config = TrainConfig(data=data, out=str(out), name="multinode", method="supervised", epochs=3,
                         steps_per_epoch=10, workers=2, learning_rate=5e-3,
                         model_params={"depth": 11, "width": 4, "stem_stride": 2},
                         stream=StreamConfig(batch_size=16, augment=AugmentConfig.none()),
                         evaluation=EvaluationConfig(top_n=(10,)))
    [version_dir] = train(config)
    return {"version_dir": str(version_dir),
            "worker_died": Path(os.environ["LENSSCAN_TEST_KILL_TRAIN_WORKER"]).exists()}


if __name__ == "__main__":
    main()
