"""The Prefill service: prefix lookup, model run over the uncached suffix, KV streaming, LMDB store."""
