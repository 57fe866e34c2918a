"""One plain function per pipeline stage.

Contract: each stage takes input locations (local paths or s3:// URIs), a validated ``Config`` and an
output location; it writes its outputs there atomically (``lf2core.storage.output_dir``, owner = the
stage's name) and returns a small dict of metrics (JSON-serialisable floats/ints). The stages are declared
once in ``lf2core.stages.table.STAGES``, from which the CLI (``lf2 <stage>``), the KFP components, the
pipeline's resources and ``run_local`` are derived. Stages only exchange files, in these documented
formats, each read and written through ``lf2core.artifacts``:

``prepare_data(cfg, out)``
    out/manifest.json  {"version": 1, "source": DOMAIN, "target": DOMAIN} with
    DOMAIN = {"name": str, "root": str (local path, s3:// URI, or a path relative to the folder holding
    manifest.json, so an output generated in place still works after it is moved or uploaded),
    "train"|"query"|"gallery":
    [[relative_path, pid, camid], ...]}.  Read it back with ``lf2core.data.manifest.read_manifest``.

``pretrain_source(cfg, data, out)``  data = a prepare_data output
    out/model.pt  lf2 checkpoint (``lf2core.checkpoint``): {"format": "lf2-checkpoint/1", "kind": "source",
    "arch", "num_classes", "state_dict", "config"}; out/metrics.json; out/state.pt while training (resume).

``extract_features(cfg, data, model, out, split="target_train")``  model = pretrain or finetune output
    out/features.npz  float32 arrays ``global``, ``upper``, ``lower`` (N x D fusion features, L2-normalised,
    rows in manifest order), int64 ``pids``, ``camids`` (ground truth where the dataset has it, else -1).

``cluster(cfg, features, out, round_index=0)``
    out/labels.npz  int64 arrays ``global``, ``upper``, ``lower``: the training labels (outlier policy
    ``cluster.outliers`` applied, -1 = never sampled; global classes 0..G-1), float32 ``centroids`` [G, C]
    (L2-normalised mean ``global`` feature per global class: the round's classifier initialisation);
    out/stats.json  per label set (of the clustering, before the outlier policy): clusters, outlier ratio,
    size histogram, NMI/ARI/pairwise P/R if known;
    out/cluster_stats.png.

``finetune(cfg, data, labels, model, out, round_index)``  model = pretrain output (round 0) or previous
    finetune output
    out/student.pt, out/teacher.pt (lf2 checkpoints, kind "lf2"), out/metrics.json (losses).

``evaluate(cfg, data, model, out)``
    out/metrics.json {"mAP", "R1", "R5", "R10", "mINP"} on the target query/gallery; out/ranklist.png.

``register(cfg, model, metrics, ...)``  logs the teacher to MLflow and registers it (``lf2core.tracking``).
"""
