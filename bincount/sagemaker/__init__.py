"""The SageMaker backend (profile ``aws``): training, tuning, endpoints and batch transform as SageMaker jobs.

Plain Python, no Prefect: the Prefect tasks reach it through the same seams as the local backend
(``get_training_backend``, ``get_serving_backend``) and, for tuning, :func:`bincount.sagemaker.tuning.get_tuning_backend`.

    session.py   options (``BINCOUNT_SAGEMAKER_*``), the one boto3 / SageMaker session factory
    naming.py    SageMaker's name limits (job names come from bincount.training.jobs.job_name)
    waiting.py   poll a job with backoff, report transitions, stop it on timeout or cancellation
    training.py  TrainingBackend: PyTorch Estimator, debugger hook, built-in rules, profiler, spot
    tuning.py    TuningBackend: HyperparameterTuner over the shared search space
    serving.py   ServingBackend: PyTorchModel endpoints (create / update / roll back), Transformer
"""
