"""Model runner side: the Qwen3 model, weight loading, the paged KV cache and the packed forward.

This package owns every tensor and the device. `workers.batch` (the forward contract) and
`workers.kv_blocks` (block accounting) import no torch, so the scheduler can use them anywhere.

    runner.py             ModelRunner: execute(segments) -> one packed forward, one host transfer
    loader.py             config.json / safetensors (single or sharded) / tokenizer / mask id; ModelDirError
    model.py              the Qwen3 model over packed rows; random_model for benchmarks
    kv_blocks.py          BlockPool (refcounted blocks) and per-sequence block tables (plain Python)
    kv_cache.py           the K/V tensors per layer and sizing from a memory budget
    attention.py          per-forward AttentionPlan and the CPU backend (SDPA per segment)
    attention_batched.py  the CUDA backend (padded groups of segments, one SDPA per group)
    reads.py              ARGMAX / PROB / SAMPLE / LOGITS on the device, per-sequence generators
"""
