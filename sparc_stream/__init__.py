"""sparc-stream's own package: the `sparc` command (`sparc_stream.cli`). The model, worker, store and replay
packages sit beside it (trainer, streams, codebook_store, replay)."""
