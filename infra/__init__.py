"""looplm.infra: where things run and record: config files, the Ray connection, the MLflow server and tracking."""
