"""The SageMaker implementations of the contracts (profile ``aws``): training, tuning, endpoints and batch transform as SageMaker jobs.

session.py   options (``BINCOUNT_SAGEMAKER_*``), the one boto3 / SageMaker session factory
waiting.py   poll a job with backoff, report transitions, stop it on timeout or cancellation
training.py  TrainingBackend: PyTorch Estimator, debugger hook, built-in rules, profiler, spot
tuning.py    TuningBackend: HyperparameterTuner over the shared search space
serving.py   ServingBackend: PyTorchModel endpoints (create / update / roll back), Transformer
"""
