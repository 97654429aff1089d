"""NNx blocks with one calling convention: ``y, new_state = block(x, state=, mask=, mode=)``."""
