"""Model runner side: the Qwen3 model, weight loading, the paged KV cache and the packed forward.

This package owns every tensor and the device. `workers.batch` (the forward contract) and
`workers.kv_blocks` (block accounting) import no torch, so the scheduler can use them anywhere.
"""
