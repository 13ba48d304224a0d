"""looplm.pipelines: one module per DAG step: synthetic data, curation, training, evaluation, registration."""
