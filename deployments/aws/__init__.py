"""The AWS worker image: its Dockerfile, and the share of requirements.lock it installs."""
