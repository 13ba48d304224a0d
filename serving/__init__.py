"""looplm.serving: the inference engine (batching, early exit, KV strategies) and the Ray Serve app.

Empty until the serving issue lands; decoding with real early exit lives in looplm.model.generation.
"""
