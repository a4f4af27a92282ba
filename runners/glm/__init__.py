"""The GLM stack on transformers' GLM classes: the model and its compression (`model`, `fast_model`,
`ops`, `packed`, `woq`, `compress`, `quality`, `prefix_cache`, `model_cache`), the engines that
serve it (`engines/`) and the CUDA / Triton kernels under it (`kernels/`)."""
