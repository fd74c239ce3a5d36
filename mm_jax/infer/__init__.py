"""Generation with a KV cache (prefill + decode) and generation-based evaluation."""
