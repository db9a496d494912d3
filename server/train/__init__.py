"""The adapter trainer (`python -m server.train`): data, trainable adapters, the training loop."""
