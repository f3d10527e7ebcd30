"""Model runner side: the Qwen3 model, weight loading, the KV tensors and the packed step.

This package owns every tensor and the device. `workers.batch` (the step contract), `workers.kv_blocks`
(block accounting), `workers.session`, `workers.packing` (with `workers.step_layout` and `workers.attention_groups`) and
`workers.validation` import no torch, so the scheduler can use them anywhere.

    runner.py      ModelRunner.execute(segments, block_tables): pack -> validate -> one upload ->
                   step_forward -> one download; SegmentError
    runner_options.py  the runner's options resolved: device and dtype, the step function (attention,
                   compiled layers, CUDA graphs)
    feedback.py    feedback tokens: a segment's first token from the previous step's read, on the device
    deferred.py    deferred reads: grammar bitmasks given after launch (ModelRunner.finish_reads)
    results.py     LaunchedStep, the one device -> host copy, values -> SegmentResults / TokenLogprobs
    session.py     RunnerSession: a runner plus its own block tables (CLI, tests, benchmarks)
    batch.py       Segment / Reads / Sampling / SegmentResult: the contract (plain Python)
    kv_blocks.py   BlockPool (refcounted blocks) and per-sequence block tables, prepare (plain Python)
    packing.py     segments + block tables -> one int64 buffer, shapes padded to buckets (numpy)
    step_layout.py StepLayout (bucketed shapes, the graph key), the buffer's fields, PackedStep (numpy)
    attention_groups.py  a step's sequences grouped by query length for attention (numpy)
    validation.py  vectorized range checks of a packed step; SegmentError (numpy)
    transfer.py    the one host -> device copy (pinned, non_blocking on CUDA)
    step.py        step_forward(model, kv, buffer, layout): the device half of a step (compilable)
    attention.py   StepAttention: device-built mask, one SDPA per layer, scratch-slot K/V writes
    reads.py       argmax / prob / Gumbel-max / top-k-top-p sampling in one pass; counter-based draws
    model.py       the Qwen3 model over packed rows; random_model for benchmarks
    kv_cache.py    the K/V tensors per layer (+ the scratch block) and sizing from a memory budget
    loader.py      config.json / safetensors (single or sharded) / tokenizer / mask id; ModelDirError:
                   check_model_dir, and the names of model_dir.py (file names, ModelDirError),
                   model_config.py (config.json), checkpoint.py (weights), tokenizer.py (tokenizer, mask and
                   end token ids)
"""
