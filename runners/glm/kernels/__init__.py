"""CUDA and Triton kernels of the fast GLM stack and their launchers; they import only `runners.glm.ops`
(and the compile cache), never an engine."""
