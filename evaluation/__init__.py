"""The evaluation layer: joins models, cam and data (dcls_jax <- models <- cam <- evaluation <- evaluate.py,
train.py; data beside)."""
