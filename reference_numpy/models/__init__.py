"""Whole models in the reference: ``forward(params, batch, config)`` and the hand-written
``loss_and_grad(params, batch, config)`` through the entire network."""
