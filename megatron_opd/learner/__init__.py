"""The learner: megatron-core model, batches, objective, optimizer, weight publishing."""
