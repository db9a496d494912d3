"""PEFT adapters from disk: configs, tensors, every served kind, in their serving form."""
