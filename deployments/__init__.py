"""Work pools, blocks and concurrency limits that the deployments in prefect.yaml run on."""
