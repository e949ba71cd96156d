"""What runs inside a SageMaker training or serving container; SageMaker ships this folder alone (``source_dir``).

Entry points: ``train.py`` (training, script mode) and ``inference.py`` (the serving handlers). Beside them:

    preprocessing   photo bytes -> uint8 pixels -> normalized tensor: the one path training and serving share
    data            channels decoded once into a uint8 cache; augmentation; normalized batches
    networks        the archs (torchvision ResNets, EfficientNet-Lite0/1/2), their normalization, ``build_model``
    loop            one training epoch, one evaluation, the record of the epochs so far
    checkpoints     the per-epoch checkpoint: fingerprint, atomic save, exact resume
    distributed     data-parallel training under torchrun: shards, gradient and metric all-reduce, rank 0 writes
    monitoring      the optional smdebug hook and torch.profiler, and the profiler summary
    model_dir       ``model.pt`` + ``model_info.json``: written by training, read by serving and evaluation
    optimized       the optional OpenVINO int8 form beside ``model.pt``: loaded for serving, or why not
    metric_format   the one metric line format and the regexes tuners read it with
    errors          ``TrainingError``
    _package        lets the entry points run as loose files (``python train.py``) and still import these

Every module imports its siblings as ``sm_scripts.<module>``; nothing here imports the project.
"""
