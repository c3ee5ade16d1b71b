"""Training the lens classifiers: data drawn from the survey itself, simulated lenses, augmentation.

- ``dataset``: ``lensscan build-dataset``: raw stamps in pools (deflector, non-lens, unlabelled,
  known lens), a held-out split by sky region (``split``), sharded Parquet.
- ``inject``: simulated strong lenses painted into raw deflector stamps (caustics, batched).
- ``lookalikes``: unlensed look-alike negatives painted the same way.
- ``augment``: batched, switchable augmentations of normalised stamps.
- ``stream``: labelled training batches with fresh lenses every epoch.
- ``show``: ``lensscan show-injections``, the picture of it all.

``training`` imports ``scanner`` (stamps are cut and normalised by the scan's own code); the
scanner never imports ``training``.
"""
