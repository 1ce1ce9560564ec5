"""Training feature drafts: data from the target, the training loop, self-distillation, dovetail-train."""
