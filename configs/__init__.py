"""Run configs: `get_config(arg)` files for `python -m distill_jax.main --config=configs/<file>.py:<arg>`."""
