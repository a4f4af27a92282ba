"""The GLM stack's engines: transformers' loop (`hf`, and `continuous` over it), the static-KV fast
engine (`fast`) and its continuous-batching slot pool (`slots`, over `kv_pool`). `base` declares
what each runs and picks one for a trial's knobs."""
