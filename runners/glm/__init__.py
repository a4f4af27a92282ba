"""The reference GLM stack on transformers' GLM classes."""
