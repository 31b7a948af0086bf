"""``python -m simclr_dist.pretrain``: validate the config, then run SimCLR pretraining on Ray Train.

Locally it starts Ray itself; under ``ray job submit`` or with ``RAY_ADDRESS`` / ``--ray-address`` it joins
the cluster; ``--no-ray`` runs the same loop in this process. From Python (a notebook)::

    from simclr_dist.pretrain import PretrainConfig, run_local
    summary = run_local(PretrainConfig(dataset="digits", epochs=5, name="nb"))   # rerun: resumes
    summary["checkpoint"], summary["history"][-1]["loss"]

Everything that can be checked without Ray (flags, data, storage, a resume's architecture) is
checked first, so a bad input costs one line and no cluster time.
"""

from __future__ import annotations

import sys

from simclr_dist.config import ConfigError, PretrainConfig, parse_config
from simclr_dist.data.datasets import DatasetError
from simclr_dist import storage
from simclr_dist.run.jobs.launch import RunError
from simclr_dist.run.jobs.pretrain_job import RUN_CONFIG_FILE, check_config, preflight, run, run_local

__all__ = ["PretrainConfig", "RUN_CONFIG_FILE", "RunError", "check_config", "main", "preflight", "run", "run_local"]


def main(argv: list[str] | None = None) -> int:
    try:
        cfg = parse_config(argv)
        summary = run(cfg)
    except (ConfigError, DatasetError, storage.StorageError, RunError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2 if isinstance(e, (ConfigError, DatasetError, storage.StorageError)) else 1
    if cfg.summary_json:
        storage.write_json(cfg.summary_json, summary)
    h = summary["history"][-1] if summary["history"] else {}
    print(f"\nSimCLR pretraining finished in {summary['wall_time_s']:.0f}s "
          f"({summary['epochs_done']} epochs; run {summary['run']})")
    if h:
        print(f"  last epoch: loss {h['loss']:.4f}, {h['samples_per_s']:.1f} samples/s")
    print(f"  checkpoint: {summary['checkpoint']}")
    tracked = summary.get("tracking")
    if tracked and tracked["kind"] == "tensorboard":
        print(f"  curves: tensorboard --logdir {tracked['location']}")
    elif tracked:
        print(f"  curves: MLflow run {tracked['run_id']} in {tracked['location']} "
              f"(mlflow ui --backend-store-uri {tracked['location']})")
    if summary["knn_top1"] is not None:
        print(f"  kNN (k={cfg.knn_k}) accuracy of the frozen encoder on the {cfg.dataset} test split: "
              f"top-1 {summary['knn_top1']:.3f}, top-5 {summary['knn_top5']:.3f}"
              + (f" (randomly initialised encoder: top-1 {summary['knn_top1_init']:.3f})"
                 if summary.get("knn_top1_init") is not None else ""))
    if summary.get("val_knn_top1") is not None:
        print(f"  kNN (k={cfg.knn_k}) accuracy on the validation split (20% of {cfg.dataset} train): "
              f"top-1 {summary['val_knn_top1']:.3f}, top-5 {summary['val_knn_top5']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
