"""`learner.ranks > 1`: data-parallel learner ranks over torch.distributed."""
