"""The ehrjax benchmark: pre-train, fine-tune every arm over labelled-set sizes and seeds, and report."""
