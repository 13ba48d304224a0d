"""The curation steps, one module each; `looplm.pipelines.curate` runs them as Ray Data stages."""
