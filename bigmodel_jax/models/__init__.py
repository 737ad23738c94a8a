"""Whole models in JAX: ``init(config, seed)``, ``forward(params, batch, config)`` and
``loss_and_grad(params, batch, config)`` per family, on the reference's parameter trees."""
